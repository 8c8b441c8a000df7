from __future__ import annotations

import torch

from nmt.data.batching import Batch
from nmt.masking import choose_positions, mask_batch, mask_tokens
from nmt.special import BOS_ID, EOS_ID, PAD_ID

MASK, VOCAB = 4, 60


def corpus(rows: int = 400, length: int = 30, seed: int = 0) -> torch.Tensor:
    """[rows, length + 1]: ordinary tokens (some UNK-free ids > MASK) ending in EOS, the rows padded
    to lengths between 1 and ``length``, one row of BOS/EOS only."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(MASK + 1, VOCAB, (rows, length + 1), generator=gen)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    for row, n in enumerate(lengths.tolist()):
        tokens[row, n] = EOS_ID
        tokens[row, n + 1:] = PAD_ID
    tokens[0, :2] = torch.tensor([BOS_ID, EOS_ID])
    tokens[0, 2:] = PAD_ID
    return tokens


def test_chooses_fifteen_percent_of_real_tokens_never_specials_and_one_per_sentence():
    tokens = corpus()
    tokens[1, 3] = MASK  # an input <mask> is not a token to predict
    chosen = choose_positions(tokens, MASK, torch.Generator().manual_seed(1))
    real = (tokens > MASK)
    assert not (chosen & ~real).any()  # never PAD, BOS, EOS or <mask>
    assert chosen[1:].any(dim=1).all()  # every sentence with a real token has one chosen
    assert not chosen[0].any()
    share = chosen.sum() / real.sum()
    assert 0.14 < share < 0.19, share  # 15%, plus the one forced in short sentences


def test_of_the_chosen_80_percent_become_mask_10_random_10_kept():
    tokens = corpus(rows=2000)
    inputs, chosen = mask_tokens(tokens, VOCAB, MASK, torch.Generator().manual_seed(2))
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # nothing else changes
    picked, original = inputs[chosen], tokens[chosen]
    n = picked.numel()
    masked = (picked == MASK).float().sum() / n
    kept = (picked == original).float().sum() / n
    assert abs(masked - 0.8) < 0.02 and 0.09 < kept < 0.12, (masked, kept)  # random draws can repeat
    randoms = picked[(picked != MASK) & (picked != original)]
    assert abs(randoms.numel() / n - 0.1) < 0.02
    assert (randoms > MASK).all() and (randoms < VOCAB).all()  # ordinary pieces only


def test_mask_batch_predicts_the_chosen_positions_only():
    src = corpus(rows=8, length=12)
    batch = Batch(src, src, src, torch.arange(0), 0, int((src != PAD_ID).sum()), src.numel())
    masked = mask_batch(batch, VOCAB, MASK, torch.Generator().manual_seed(3))
    chosen = masked.tgt_out != PAD_ID
    assert torch.equal(masked.tgt_positions, torch.nonzero(chosen.view(-1)).squeeze(1))
    assert masked.n_tgt_tokens == int(chosen.sum()) > 0
    assert torch.equal(masked.targets(), src[chosen])  # the original tokens, not the inputs
    assert torch.equal(masked.src[~chosen], src[~chosen])


def test_same_generator_seed_same_mask_and_global_rng_by_default():
    tokens = corpus(rows=16)
    first = mask_tokens(tokens, VOCAB, MASK, torch.Generator().manual_seed(5))
    again = mask_tokens(tokens, VOCAB, MASK, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    torch.manual_seed(7)
    one = mask_tokens(tokens, VOCAB, MASK)
    torch.manual_seed(7)
    two = mask_tokens(tokens, VOCAB, MASK)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
