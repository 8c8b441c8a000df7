from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nmt.data.batching import Batch, TokenBatchSampler, _sort, collate, padding_efficiency
from nmt.data.store import ParallelData, TokenArray
from nmt.errors import NMTError
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID


def realistic_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Subword lengths shaped like Multi30k: log-normal source, target ~ source * noise."""
    rng = np.random.default_rng(seed)
    src = np.clip(rng.lognormal(2.6, 0.35, n).astype(np.int64), 1, 80)
    tgt = np.clip((src * rng.normal(1.05, 0.15, n)).astype(np.int64), 1, 90)
    return src, tgt


def make_data(src_lens, tgt_lens, seed: int = 0) -> ParallelData:
    rng = np.random.default_rng(seed)

    def array(lens):
        lens = np.asarray(lens, dtype=np.int64)
        return TokenArray.from_lengths(rng.integers(4, 1000, lens.sum()).astype(np.uint16), lens)

    return ParallelData(array(src_lens), array(tgt_lens))


def take(sampler: TokenBatchSampler, n: int) -> list[list[int]]:
    return [batch.tolist() for batch in itertools.islice(iter(sampler), n)]


SRC, TGT = realistic_lengths(3000)


def test_every_index_once_per_epoch():
    sampler = TokenBatchSampler(SRC, TGT, batch_tokens=500, seed=1)
    for epoch in range(2):
        indices = sorted(i for batch in sampler.epoch_batches(epoch) for i in batch)
        assert indices == list(range(len(SRC)))


def test_token_bound_respected():
    sampler = TokenBatchSampler(SRC, TGT, batch_tokens=300, seed=1)
    for batch in sampler.epoch_batches(0):
        assert (SRC[batch].max() + 1) * len(batch) <= 300
        assert (TGT[batch].max() + 1) * len(batch) <= 300


def test_collated_batch_within_bound():
    data = make_data(SRC[:400], TGT[:400])
    sampler = TokenBatchSampler(data.src.lengths(), data.tgt.lengths(), batch_tokens=256, seed=2)
    for indices in sampler.epoch_batches(0):
        batch = collate(data, indices)
        assert batch.src.numel() <= 256 and batch.tgt_out.numel() <= 256


def test_over_long_sentence_is_its_own_batch():
    src, tgt = np.array([5, 500, 6, 7]), np.array([5, 5, 6, 700])
    batches = TokenBatchSampler(src, tgt, batch_tokens=100, seed=0).epoch_batches(0).tolist()
    assert [1] in batches and [3] in batches
    assert sorted(map(sorted, batches)) == [[0, 2], [1], [3]]


def test_deterministic_per_seed_and_epoch():
    a = TokenBatchSampler(SRC, TGT, batch_tokens=500, seed=7)
    b = TokenBatchSampler(SRC, TGT, batch_tokens=500, seed=7)
    assert a.epoch_batches(3) == b.epoch_batches(3)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert TokenBatchSampler(SRC, TGT, batch_tokens=500, seed=8).epoch_batches(0) != a.epoch_batches(0)


def test_iteration_runs_epoch_after_epoch():
    sampler = TokenBatchSampler(SRC, TGT, batch_tokens=2000, seed=1)
    per_epoch = len(sampler)
    got = take(sampler, per_epoch + 2)
    assert got == sampler.epoch_batches(0).tolist() + sampler.epoch_batches(1)[:2].tolist()
    assert sampler.state_dict() == {"epoch": 1, "position": 2}


@pytest.mark.parametrize("consumed", [5, 40])  # mid-epoch, and across an epoch boundary
def test_resume_mid_epoch(consumed):
    reference = TokenBatchSampler(SRC, TGT, batch_tokens=2000, seed=3)
    expected = take(reference, consumed + 10)
    first = TokenBatchSampler(SRC, TGT, batch_tokens=2000, seed=3)
    take(first, consumed)
    state = first.state_dict()
    resumed = TokenBatchSampler(SRC, TGT, batch_tokens=2000, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 10) == expected[consumed:]


def test_ddp_shards_disjoint_equal_and_covering():
    world = 3
    full = TokenBatchSampler(SRC, TGT, batch_tokens=700, seed=5)
    shards = [TokenBatchSampler(SRC, TGT, batch_tokens=700, seed=5, rank=r, world_size=world)
              for r in range(world)]
    for epoch in range(2):
        per_rank = [s.epoch_batches(epoch) for s in shards]
        assert len({len(b) for b in per_rank}) == 1
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert len(seen) == len(set(seen))
        kept = full.global_batches(epoch)[: len(per_rank[0]) * world]
        assert sorted(seen) == sorted(i for batch in kept for i in batch)
        assert len(full.global_batches(epoch)) - len(kept) < world


def test_too_few_batches_for_world_size():
    sampler = TokenBatchSampler([3, 3], [3, 3], batch_tokens=1000, seed=0, rank=1, world_size=2)
    with pytest.raises(NMTError, match="batches"):
        sampler.epoch_batches(0)


def test_unshuffled_is_one_sorted_pass():
    sampler = TokenBatchSampler(SRC, TGT, batch_tokens=800, seed=0, shuffle=False)
    batches = [batch.tolist() for batch in sampler]
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(SRC)))
    assert np.all(np.diff(SRC[flat]) >= 0)
    assert [batch.tolist() for batch in sampler] == batches


def test_collate_layout():
    data = ParallelData(
        TokenArray.from_lengths(np.array([10, 11, 12, 20], np.uint16), np.array([3, 1])),
        TokenArray.from_lengths(np.array([30, 40, 41], np.uint16), np.array([1, 2])),
    )
    batch = collate(data, [1, 0])
    P, B, E = PAD_ID, BOS_ID, EOS_ID
    assert batch.src.tolist() == [[20, E, P, P], [10, 11, 12, E]]
    assert batch.tgt_in.tolist() == [[B, 40, 41], [B, 30, P]]
    assert batch.tgt_out.tolist() == [[40, 41, E], [30, E, P]]
    assert batch.src.dtype == batch.tgt_in.dtype == torch.long
    assert (batch.n_src_tokens, batch.n_tgt_tokens, batch.padded_tokens) == (6, 5, 8 + 6)
    assert padding_efficiency(batch) == pytest.approx(11 / 14)
    assert len(batch) == 2


def test_collate_empty_sentence_and_to():
    data = ParallelData(TokenArray.from_lengths(np.array([7], np.uint16), np.array([0, 1])),
                        TokenArray.from_lengths(np.array([], np.uint16), np.array([0, 0])))
    batch = collate(data, [0, 1]).to("cpu")
    assert isinstance(batch, Batch)
    assert batch.src.tolist() == [[EOS_ID, PAD_ID], [7, EOS_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID], [BOS_ID]]
    assert batch.tgt_out.tolist() == [[EOS_ID], [EOS_ID]]


def test_padding_efficiency_on_realistic_lengths():
    src, tgt = realistic_lengths(20_000, seed=4)
    data = make_data(src, tgt)
    sampler = TokenBatchSampler(src, tgt, batch_tokens=4096, seed=1)
    real = padded = 0
    for indices in sampler.epoch_batches(0):
        batch = collate(data, indices)
        real += batch.n_src_tokens + batch.n_tgt_tokens
        padded += batch.padded_tokens
    assert real / padded >= 0.9


def reference_pack(order: list[int], src: list[int], tgt: list[int], batch_tokens: int) -> list[list[int]]:
    """The per-sentence greedy packing that the numpy packing must reproduce."""
    batches: list[list[int]] = []
    current: list[int] = []
    max_src = max_tgt = 0
    for i in order:
        new_src, new_tgt = max(max_src, src[i]), max(max_tgt, tgt[i])
        if current and (new_src * (len(current) + 1) > batch_tokens or new_tgt * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current, max_src, max_tgt = [i], src[i], tgt[i]
        else:
            current.append(i)
            max_src, max_tgt = new_src, new_tgt
    return batches + [current]


@pytest.mark.parametrize("batch_tokens", [7, 300, 4096])
def test_numpy_packing_equals_greedy_reference(batch_tokens):
    src, tgt = realistic_lengths(5000, seed=9)
    src[::97] = 400  # some longer than a small batch_tokens
    for shuffle in (False, True):
        plan = TokenBatchSampler(src, tgt, batch_tokens, seed=4, shuffle=shuffle).global_batches(2)
        order = np.concatenate(list(plan)) if not shuffle else np.lexsort(
            (np.random.default_rng([4, 2]).permutation(len(src)), tgt, src))
        expected = reference_pack(order.tolist(), (src + 1).tolist(), (tgt + 1).tolist(), batch_tokens)
        assert sorted(plan.tolist()) == sorted(expected)
        assert plan.order.dtype == np.int32 and isinstance(plan[0], np.ndarray)


def test_packed_sort_key_equals_lexsort():
    src, tgt = realistic_lengths(20_000, seed=3)
    tie = np.random.default_rng(0).permutation(len(src))
    expected = np.lexsort((tie, tgt, src))
    assert np.array_equal(_sort(src.astype(np.int32), tgt.astype(np.int32), tie), expected)
    long = src.copy()
    long[0] = 40_000  # too long for the packed key: the lexsort fallback
    assert np.array_equal(_sort(long, tgt, tie), np.lexsort((tie, tgt, long)))


def test_each_epoch_is_planned_on_its_own_segmentation_lengths():
    sampled = {e: realistic_lengths(len(SRC), seed=10 + e) for e in range(3)}  # same sentences, other lengths
    sampler = TokenBatchSampler(SRC, TGT, batch_tokens=600, seed=3, epoch_lengths=lambda e: sampled[e % 3])
    plain = TokenBatchSampler(SRC, TGT, batch_tokens=600, seed=3)
    for epoch in range(4):
        src, tgt = sampled[epoch % 3]
        batches = sampler.epoch_batches(epoch).tolist()
        assert sorted(itertools.chain(*batches)) == list(range(len(SRC)))  # the same sentence set
        assert all(len(b) * (src[b].max() + 1) <= 600 and len(b) * (tgt[b].max() + 1) <= 600 for b in batches)
        assert batches != plain.epoch_batches(epoch).tolist()
    assert sampler.epoch_batches(3) != sampler.epoch_batches(0)  # same lengths, another shuffle


def test_numbered_batches_name_their_epoch_and_resume_there():
    sampler = TokenBatchSampler(SRC, TGT, batch_tokens=2000, seed=1)
    per_epoch = len(sampler)
    got = list(itertools.islice(sampler.numbered(), 2 * per_epoch + 1))
    assert [e for e, _ in got] == [0] * per_epoch + [1] * per_epoch + [2]
    resumed = TokenBatchSampler(SRC, TGT, batch_tokens=2000, seed=1)
    resumed.load_state_dict({"epoch": 1, "position": per_epoch - 1})
    epoch, batch = next(resumed.numbered())
    assert epoch == 1 and batch.tolist() == got[2 * per_epoch - 1][1].tolist()


def test_ddp_ranks_share_each_epochs_segmentation_plan():
    sampled = {e: realistic_lengths(len(SRC), seed=20 + e) for e in range(2)}
    ranks = [TokenBatchSampler(SRC, TGT, batch_tokens=600, seed=5, rank=r, world_size=2,
                               epoch_lengths=lambda e: sampled[e % 2]) for r in range(2)]
    single = TokenBatchSampler(SRC, TGT, batch_tokens=600, seed=5, epoch_lengths=lambda e: sampled[e % 2])
    for epoch in range(3):
        mine = [r.epoch_batches(epoch).tolist() for r in ranks]
        everyone = single.global_batches(epoch).tolist()
        assert len(mine[0]) == len(mine[1])
        assert mine[0] == everyone[0:2 * len(mine[0]):2] and mine[1] == everyone[1:2 * len(mine[1]):2]
