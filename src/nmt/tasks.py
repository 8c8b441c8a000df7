"""What differs between the training tasks (``task``): the objective the trainer calls, how a batch
of the data becomes a training batch, and the validation scores. Plain dicts by task."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from nmt.data.batching import Batch
from nmt.evaluate import evaluate_model
from nmt.loss import Objective
from nmt.masking import mask_batch
from nmt.mlm import MaskedLMObjective, evaluate_mlm, masking_for
from nmt.tokenizer import Tokenizer

OBJECTIVES: dict[str, type[nn.Module]] = {"translation": Objective, "lm": Objective, "mlm": MaskedLMObjective}
"""task -> the objective module, called as (src, tgt_in, positions, targets, grad_scale) -> (loss, NLL)."""

VALIDATION: dict[str, Callable] = {"translation": evaluate_model, "lm": evaluate_model, "mlm": evaluate_mlm}
"""task -> (model, data, cfg, device) -> validation scores, ``valid_loss`` among them."""


def batch_maker(task: str, tokenizer: Tokenizer) -> Callable[[Batch], Batch]:
    """The data's batch -> the batch a training step computes on: masked for mlm (with the
    training RNG, which checkpoints carry), as it is otherwise."""
    if task == "mlm":
        vocab_size, mask_id = masking_for(tokenizer)
        return partial(mask_batch, vocab_size=vocab_size, mask_id=mask_id)
    return lambda batch: batch
