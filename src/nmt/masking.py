"""BERT's masking of a batch for masked-LM training: 15% of the real tokens are chosen (at least one
per sentence), and of those 80% become ``<mask>``, 10% a random ordinary token and 10% stay; the
loss covers the chosen positions only."""

from __future__ import annotations

import torch

from nmt.data.batching import Batch
from nmt.special import BOS_ID, EOS_ID, PAD_ID

CHOOSE = 0.15
"""Share of a sentence's real tokens that are predicted."""
REPLACE_MASK, REPLACE_RANDOM = 0.8, 0.1
"""Of the chosen: share replaced by ``<mask>``, share replaced by a random token (the rest stay)."""


def choose_positions(tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """tokens [B, S] -> Bool [B, S], True at the chosen positions: ``CHOOSE`` of the real tokens
    (not PAD, BOS, EOS or ``<mask>``), and at least one in every sentence that has one."""
    real = (tokens != PAD_ID) & (tokens != BOS_ID) & (tokens != EOS_ID) & (tokens != mask_id)
    noise = torch.rand(tokens.shape, generator=generator)
    chosen = real & (noise < CHOOSE)
    # a sentence without a chosen token gets its real token of lowest noise: every row is trained on
    lowest = noise.masked_fill(~real, 2.0).argmin(dim=1)  # [B]
    rows = torch.nonzero(real.any(dim=1) & ~chosen.any(dim=1)).squeeze(1)
    chosen[rows, lowest[rows]] = True
    return chosen


def mask_tokens(tokens: torch.Tensor, vocab_size: int, mask_id: int, generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, S] (CPU) -> (inputs [B, S] with the chosen positions replaced, chosen Bool [B, S]).

    Random replacements are ordinary pieces: ids after ``mask_id``, which follows the fixed
    special ids. ``generator``: None draws from torch's global CPU generator (the training RNG,
    saved in checkpoints, so a resumed run masks as the uninterrupted one would)."""
    chosen = choose_positions(tokens, mask_id, generator)
    action = torch.rand(tokens.shape, generator=generator)
    random_tokens = torch.randint(mask_id + 1, vocab_size, tokens.shape, generator=generator)
    inputs = tokens.clone()
    inputs[chosen & (action < REPLACE_MASK)] = mask_id
    to_random = chosen & (action >= REPLACE_MASK) & (action < REPLACE_MASK + REPLACE_RANDOM)
    inputs[to_random] = random_tokens[to_random]
    return inputs, chosen


def mask_batch(batch: Batch, vocab_size: int, mask_id: int, generator: torch.Generator | None = None) -> Batch:
    """A batch of source text (task mlm) as a masked-LM batch: ``src`` the masked inputs, ``tgt_out``
    the original tokens at the chosen positions (PAD elsewhere) and ``tgt_positions`` those
    positions, so that ``targets()`` and ``n_tgt_tokens`` count the predicted tokens only;
    ``tgt_in`` is the unmasked text. The predicted tokens count as padded positions too, so that
    the padding efficiency stays the share of real tokens among the positions computed on."""
    inputs, chosen = mask_tokens(batch.src, vocab_size, mask_id, generator)
    labels = batch.src.masked_fill(~chosen, PAD_ID)  # [B, S]
    positions = torch.nonzero(chosen.view(-1)).squeeze(1)
    return Batch(inputs, batch.src, labels, positions, n_tgt_tokens=positions.numel(),
                 n_src_tokens=batch.n_src_tokens, padded_tokens=batch.src.numel() + positions.numel())
