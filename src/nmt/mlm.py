"""The masked-LM task (``task: mlm``): its training objective, its validation scores and
``nmt fill-mask``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nmt.errors import NMTError
from nmt.loss import Objective, label_smoothed_nll
from nmt.masking import mask_batch
from nmt.special import EOS_ID, MASK_PIECE, PAD_ID

if TYPE_CHECKING:
    from nmt.config import Config
    from nmt.data.prepare import PreparedData
    from nmt.tokenizer import Tokenizer


class MaskedLMObjective(Objective):
    """The translation ``Objective`` on the encoder's states at the chosen positions of the
    masked ``src``; ``tgt_in`` (the unmasked text) is not read."""

    def states(self, src: torch.Tensor, tgt_in: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """src [B, S] masked inputs, positions Long [N] into B*S -> [N, D]."""
        return self.model.masked_states(src, src.eq(PAD_ID), positions)


def masking_for(tokenizer: Tokenizer) -> tuple[int, int]:
    """(vocabulary size, ``<mask>`` id) of a task mlm tokenizer."""
    if tokenizer.mask_id is None:
        raise NMTError(f"this tokenizer has no {MASK_PIECE} piece: masked-LM training needs one trained "
                       "for task=mlm (train.init_vocab=new, or a parent trained with task=mlm)")
    return tokenizer.src_vocab_size, tokenizer.mask_id


def evaluate_mlm(model: nn.Module, data: PreparedData, cfg: Config, device: torch.device) -> dict[str, float]:
    """Masked-token NLL, perplexity and accuracy on the validation split, under one fixed mask
    (seeded with ``train.seed``), so that validations are comparable with each other."""
    from nmt.evaluate import iter_batches
    from nmt.runtime import autocast_context

    vocab, mask_id = masking_for(data.tokenizer)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    was_training = model.training
    model.eval()
    nll = correct = torch.zeros((), device=device)  # summed on the device: one host sync at the end
    tokens = 0
    with torch.inference_mode(), autocast_context(device, cfg.train.precision):
        for batch in iter_batches(data.valid, cfg.train.batch_tokens):
            batch = mask_batch(batch, vocab, mask_id, generator).to(device)
            targets = batch.targets()
            hidden = model.masked_states(batch.src, batch.src.eq(PAD_ID), batch.tgt_positions)  # [N, D]
            nll = nll + label_smoothed_nll(hidden, model.output_proj.weight, targets, 0.0)[1]
            correct = correct + (model.head(hidden).argmax(dim=-1) == targets).sum()
            tokens += batch.n_tgt_tokens
    model.train(was_training)
    loss = float(nll) / max(tokens, 1)
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50)),
            "valid_accuracy": 100.0 * float(correct) / max(tokens, 1)}


@torch.inference_mode()
def fill_mask(model: Any, tokenizer: Tokenizer, text: str, top_k: int) -> list[list[tuple[str, float]]]:
    """For each ``<mask>`` of ``text``, its ``top_k`` most likely fillers (detokenized piece,
    probability), most likely first. ``model`` is an encoder-only model in eval mode."""
    ids = tokenizer.encode_src([text])[0][: model.max_positions - 1] + [EOS_ID]
    src = torch.tensor([ids], device=next(model.parameters()).device)  # [1, S]
    where = torch.nonzero(src[0] == tokenizer.mask_id).squeeze(1)  # [M]
    if where.numel() == 0:
        raise NMTError(f"no {MASK_PIECE} in the text: write {MASK_PIECE} where a word is to be filled in")
    hidden = model.encode(src, src.eq(PAD_ID))[0, where]  # [M, D]
    probs, best = model.head(hidden).float().softmax(dim=-1).topk(min(top_k, tokenizer.src_vocab_size))
    # a piece that detokenizes to nothing is SentencePiece's word boundary: shown as its mark
    return [[(tokenizer.decode_src([[int(i)]])[0] or "\u2581", float(p)) for p, i in zip(row_p, row_i, strict=True)]
            for row_p, row_i in zip(probs, best, strict=True)]
