"""Label-smoothed cross-entropy over non-pad target tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmt.tokenizer import PAD_ID


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, plain NLL), both summed over non-pad tokens.

    logits: [..., V]; target: [...] (e.g. [B, T, V] and [B, T], or [N, V] and [N]). Computed in
    fp32 even under autocast, since the log-softmax over a large vocabulary loses precision in half
    precision.
    """
    flat = logits.reshape(-1, logits.size(-1)).float()  # [B*T, V]
    tgt = target.reshape(-1)
    lprobs = F.log_softmax(flat, dim=-1)
    nll = F.nll_loss(lprobs, tgt, ignore_index=PAD_ID, reduction="sum")
    if smoothing == 0.0:
        return nll, nll.detach()
    keep = tgt.ne(PAD_ID)
    smooth = -(lprobs.sum(dim=-1) * keep).sum()
    # Spread epsilon over the vocabulary as in the paper (and fairseq): eps / V per class.
    loss = (1.0 - smoothing) * nll + smoothing / lprobs.size(-1) * smooth
    return loss, nll.detach()
