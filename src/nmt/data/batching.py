"""Token-bounded, length-grouped, seeded, resumable and DDP-sharded batches, and their collation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nmt.data.store import ParallelData, PreparedData
from nmt.errors import NMTError
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID

EpochLengths = Callable[[int], tuple[np.ndarray, np.ndarray]]


@dataclass
class Batch:
    src: torch.Tensor  # [B, S] long, PAD_ID padded, no BOS, ends with EOS
    tgt_in: torch.Tensor  # [B, T] long: BOS y1 .. yn (PAD padded)
    tgt_out: torch.Tensor  # [B, T] long: y1 .. yn EOS (PAD padded)
    tgt_positions: torch.Tensor  # [N] long: flat indices of the non-pad positions of tgt_out
    n_tgt_tokens: int  # N, non-pad tokens in tgt_out
    n_src_tokens: int
    padded_tokens: int  # B*S + B*T

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(self.src.to(device, non_blocking=non_blocking),
                     self.tgt_in.to(device, non_blocking=non_blocking),
                     self.tgt_out.to(device, non_blocking=non_blocking),
                     self.tgt_positions.to(device, non_blocking=non_blocking),
                     self.n_tgt_tokens, self.n_src_tokens, self.padded_tokens)

    def targets(self) -> torch.Tensor:
        """[N] the non-pad target tokens, in the order of ``tgt_positions``."""
        return self.tgt_out.view(-1).index_select(0, self.tgt_positions)

    def __len__(self) -> int:
        return self.src.shape[0]


def padding_efficiency(batch: Batch) -> float:
    """Share of real (non-pad) tokens among all src + tgt positions of the batch."""
    return (batch.n_src_tokens + batch.n_tgt_tokens) / batch.padded_tokens


def collate(data: ParallelData, indices: Sequence[int]) -> Batch:
    """Pad the selected pairs: src = x EOS, tgt_in = BOS y, tgt_out = y EOS."""
    idx = np.asarray(indices, dtype=np.int64)
    rows = np.arange(len(idx))
    src_lens, src_mask, src_tokens = data.src.take(idx)
    src = np.full((len(idx), src_mask.shape[1] + 1), PAD_ID, dtype=np.int64)  # [B, S]
    src[:, :-1][src_mask] = src_tokens
    src[rows, src_lens] = EOS_ID
    tgt_lens, tgt_mask, tgt_tokens = data.tgt.take(idx)
    tgt_out = np.full((len(idx), tgt_mask.shape[1] + 1), PAD_ID, dtype=np.int64)  # [B, T]
    tgt_in = np.full_like(tgt_out, PAD_ID)
    tgt_out[:, :-1][tgt_mask] = tgt_tokens
    tgt_out[rows, tgt_lens] = EOS_ID
    tgt_in[:, 1:][tgt_mask] = tgt_tokens
    tgt_in[:, 0] = BOS_ID
    n_src, n_tgt = int(src_lens.sum()) + len(idx), int(tgt_lens.sum()) + len(idx)
    # Computed here on the host, so the device never syncs to find them.
    positions = np.flatnonzero(tgt_out != PAD_ID)
    return Batch(torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out),
                 torch.from_numpy(positions), n_tgt_tokens=n_tgt, n_src_tokens=n_src,
                 padded_tokens=src.size + tgt_out.size)


class BatchPlan(Sequence):
    """Batches as slices of one index array: batch ``k`` is ``order[begin[k]:end[k]]``.

    An epoch of a large corpus is three numpy arrays, not a Python list per sentence.
    """

    def __init__(self, order: np.ndarray, begin: np.ndarray, end: np.ndarray) -> None:
        self.order, self.begin, self.end = order, begin, end

    def __len__(self) -> int:
        return len(self.begin)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return BatchPlan(self.order, self.begin[k], self.end[k])
        return self.order[self.begin[k]:self.end[k]]

    def tolist(self) -> list[list[int]]:
        return [batch.tolist() for batch in self]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BatchPlan):
            other = other.tolist()
        return isinstance(other, list) and self.tolist() == other

    __hash__ = None  # type: ignore[assignment]


class TokenBatchSampler:
    """Arrays of example indices with at most ``batch_tokens`` padded tokens per side.

    ``src_lens``/``tgt_lens`` are raw subword counts (``TokenArray.lengths()``); one is added to
    each for the EOS (source) or BOS/EOS (target) that ``collate`` adds, so ``batch_tokens``
    bounds ``B * S`` and ``B * T`` of the collated batch. A sentence longer than ``batch_tokens``
    forms a batch of its own. Everything per sentence lives in numpy arrays.

    ``epoch_lengths(epoch)``, when given, returns the (source, target) lengths of the segmentation
    that epoch trains on (the same sentences, other subword counts): each epoch is planned on its
    own lengths. Only the plan of the current epoch is held.
    """

    def __init__(self, src_lens: Sequence[int] | np.ndarray, tgt_lens: Sequence[int] | np.ndarray,
                 batch_tokens: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, epoch_lengths: EpochLengths | None = None) -> None:
        src = np.asarray(src_lens, dtype=np.int32) + 1  # int32: half of int64's memory
        tgt = np.asarray(tgt_lens, dtype=np.int32) + 1
        if src.shape != tgt.shape or src.ndim != 1:
            raise ValueError(f"src_lens and tgt_lens must be 1-D of equal length: {src.shape} vs {tgt.shape}")
        if len(src) == 0:
            raise NMTError("cannot batch an empty dataset")
        if not 0 <= rank < world_size or batch_tokens < 1:
            raise ValueError(f"bad rank/world_size/batch_tokens: {rank}/{world_size}/{batch_tokens}")
        self._src, self._tgt = src, tgt
        self._epoch_lengths = epoch_lengths
        self.batch_tokens, self.seed, self.shuffle = batch_tokens, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, BatchPlan] | None = None

    def global_batches(self, epoch: int) -> BatchPlan:
        """All ranks' batches of ``epoch``, in the order they are consumed."""
        if not self.shuffle:
            order = _sort(self._src, self._tgt, np.arange(len(self._src)))  # index order breaks ties
            begin = _pack(self._src[order], self._tgt[order], self.batch_tokens)
            return BatchPlan(_compact(order), begin, np.append(begin[1:], len(order)))
        src, tgt = self._lengths(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        order = _sort(src, tgt, rng.permutation(len(src)))
        begin = _pack(src[order], tgt[order], self.batch_tokens)
        end = np.append(begin[1:], len(order))
        shuffle = rng.permutation(len(begin))
        return BatchPlan(_compact(order), begin[shuffle], end[shuffle])

    def _lengths(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Source and target lengths of ``epoch``'s segmentation, with the added EOS/BOS."""
        if self._epoch_lengths is None:
            return self._src, self._tgt
        src, tgt = self._epoch_lengths(epoch)
        if len(src) != len(self._src) or len(tgt) != len(self._tgt):
            raise ValueError(f"epoch {epoch}: {len(src)}/{len(tgt)} lengths for {len(self._src)} sentences")
        return np.asarray(src, dtype=np.int32) + 1, np.asarray(tgt, dtype=np.int32) + 1

    def epoch_batches(self, epoch: int) -> BatchPlan:
        """This rank's batches of ``epoch``: global batches ``rank, rank + W, ...``."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        self._cache = None  # free the previous epoch's plan before building the next
        batches = self.global_batches(epoch)
        world = self.world_size
        if self.shuffle:
            if len(batches) < world:
                raise NMTError(f"only {len(batches)} batches of {self.batch_tokens} tokens for "
                               f"{world} processes; lower train.batch_tokens or use more data")
            batches = batches[: len(batches) - len(batches) % world]  # equal count per rank
        mine = batches[self.rank::world]
        self._cache = (epoch, mine)
        return mine

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch if self.shuffle else 0))

    def __iter__(self) -> Iterator[np.ndarray]:
        """One pass when ``shuffle`` is false; otherwise epoch after epoch, forever."""
        if not self.shuffle:
            yield from self.epoch_batches(0)
            return
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.position < len(batches):
                self.position += 1  # advanced before yielding: state_dict names the next batch
                yield batches[self.position - 1]
            self.epoch += 1
            self.position = 0

    def numbered(self) -> Iterator[tuple[int, np.ndarray]]:
        """``__iter__``'s batches with the epoch each belongs to (which segmentation its indices
        refer to)."""
        for batch in self:
            yield (self.epoch if self.shuffle else 0), batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _sort(src: np.ndarray, tgt: np.ndarray, tie_break: np.ndarray) -> np.ndarray:
    """Indices sorted by source length, then target length, then ``tie_break`` (a permutation).

    The three keys are packed into one int64 when they fit: the packed keys are unique, so any
    sort gives the order of ``np.lexsort`` and the fast unstable one can be used (lexsort compares
    key by key and is much slower on millions of sentences).
    """
    if max(int(src.max()), int(tgt.max())) < 2**15 and len(src) < 2**32:
        key = src.astype(np.int64)  # built in place: one corpus-sized temporary, not five
        key <<= 48
        part = tgt.astype(np.int64)
        part <<= 32
        key |= part
        del part
        key |= tie_break
        return np.argsort(key)
    return np.lexsort((tie_break, tgt, src))  # last key is the primary one


def _compact(order: np.ndarray) -> np.ndarray:
    return order.astype(np.int32) if len(order) < 2**31 else order


def _pack(src: np.ndarray, tgt: np.ndarray, batch_tokens: int) -> np.ndarray:
    """Start positions of greedy batches over sentences in this order: each batch is the longest
    run with max(len) * n <= batch_tokens on both sides (at least one sentence).

    One numpy step per batch, not per sentence: a batch holds at most
    ``batch_tokens // max(first lengths)`` sentences, so only that window is examined.
    """
    n = len(src)
    begins = []
    i = 0
    while i < n:
        begins.append(i)
        cap = max(1, batch_tokens // max(int(src[i]), int(tgt[i])))
        longest = np.maximum(np.maximum.accumulate(src[i:i + cap]), np.maximum.accumulate(tgt[i:i + cap]))
        size = np.arange(1, len(longest) + 1)
        # longest * size only grows along the window, so the fitting prefix is the count of fits
        i += max(1, int(np.count_nonzero(longest * size <= batch_tokens)))
    return np.asarray(begins, dtype=np.int64)


def epoch_lengths(data: PreparedData) -> EpochLengths:
    """Lengths of the segmentation each training epoch uses (``PreparedData.train_for_epoch``)."""
    def lengths(epoch: int) -> tuple[np.ndarray, np.ndarray]:
        train = data.train_for_epoch(epoch)
        return train.src.lengths(np.int32), train.tgt.lengths(np.int32)
    return lengths
