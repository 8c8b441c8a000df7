"""Encoding text into token arrays: the training split in chunks, cleaned and tokenized in worker
processes and appended, in corpus order, to the binarized cache files; the small splits in this
process."""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from nmt.config import Config
from nmt.data.clean import clean_pairs, length_filter
from nmt.data.corpus import CHUNK, Chunk, iter_split, mono_side
from nmt.data.pool import spawn_pool
from nmt.data.store import TokenArray
from nmt.tokenizer import Tokenizer, cpu_count

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # src tokens, src lengths, tgt tokens, tgt lengths
Encoded = tuple[list[Arrays], dict[str, int]]  # the deterministic segmentation first, then the sampled ones
T = TypeVar("T")

ENCODE_CHUNK = 50_000  # sentences per encode call: bounds Python-list memory on large corpora
PROGRESS_MIN = 200_000  # show a progress bar only for corpora at least this large
OFFSET_BLOCK = 1 << 20  # sentences per block when the offsets are summed up
_worker: dict[str, Any] = {}  # a worker process's tokenizer and settings


def encode_train(cfg: Config, tokenizer: Tokenizer, out: Path, dtype: type) -> dict[str, int]:
    """Clean and encode the training split into ``out/train.{src,tgt}.{bin,offsets.npy}``, and its
    ``tokenizer.sampled_segmentations`` sampled segmentations into ``out/train.sample{k}.*``.

    Returns pair counts: read, kept, and dropped as empty / unreadable / over max_len / over
    max_len_ratio.
    One chunk is encoded in this process when the corpus fits in it; larger corpora go to a
    pool of one process per core, with at most two chunks per process in flight so that
    memory stays bounded however fast the corpus is read.
    """
    d, tok, side = cfg.data, cfg.tokenizer, mono_side(cfg)
    # monolingual text: no length ratio to an empty side
    ratio = d.max_len_ratio if side is None else float("inf")
    settings = (tokenizer.to_state(), np.dtype(dtype).str, d.max_len, ratio, side is not None,
                tok.sampled_segmentations, tok.sampling_alpha)
    # sampling multiplies the work of a chunk: smaller chunks keep every worker busy to the end
    chunk = max(1, CHUNK // (1 + tok.sampled_segmentations))
    chunks = enumerate(_progress(iter_split(d, "train", chunk=chunk, side=side), "encode train"))
    counts = {"read": 0, "kept": 0, "empty": 0, "unreadable": 0, "max_len": 0, "max_len_ratio": 0}
    with contextlib.ExitStack() as stack:
        writers = [(stack.enter_context(_Writer(out, f"{name}.src", dtype)),
                    stack.enter_context(_Writer(out, f"{name}.tgt", dtype)))
                   for name in train_sets(tok.sampled_segmentations)]
        for sets, stats in _encoded(chunks, settings):
            for (src_out, tgt_out), (src, src_lens, tgt, tgt_lens) in zip(writers, sets, strict=True):
                src_out.append(src, src_lens)
                tgt_out.append(tgt, tgt_lens)
            for key, value in stats.items():
                counts[key] += value
    return counts


def train_sets(sampled: int) -> list[str]:
    """Names of the training split's token-array sets: the deterministic segmentation, then the
    sampled ones."""
    return ["train"] + [f"train.sample{k}" for k in range(sampled)]


def _encoded(chunks: Iterator[tuple[int, Chunk]], settings: tuple) -> Iterator[Encoded]:
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    _init_worker(*settings)
    if second is None:  # small corpus: starting processes would cost more than it saves
        yield _encode_chunk(first)
        return
    workers = cpu_count()
    with spawn_pool(workers, "encoding the training split", initializer=_init_worker, initargs=settings) as pool:
        pending: deque[Future] = deque()
        for chunk in _chain(first, second, chunks):
            pending.append(pool.submit(_encode_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chain(first: T, second: T, rest: Iterator[T]) -> Iterator[T]:
    yield first
    yield second
    yield from rest


def _init_worker(protos: dict[str, bytes], dtype: str, max_len: int, max_ratio: float, mono: bool,
                 sampled: int, alpha: float) -> None:
    _worker.update(tokenizer=Tokenizer.from_state(protos), dtype=np.dtype(dtype), max_len=max_len,
                   max_ratio=max_ratio, mono=mono, sampled=sampled, alpha=alpha)


def _encode_chunk(numbered: tuple[int, Chunk]) -> Encoded:
    """Strip, drop empty and unreadable pairs, encode, drop pairs over the length limits; flat token
    arrays of the deterministic segmentation, then of each sampled one."""
    index, chunk = numbered
    tokenizer: Tokenizer = _worker["tokenizer"]
    src, tgt, n_empty, n_unreadable = clean_pairs(*chunk, mono=_worker["mono"])
    src_ids, tgt_ids = tokenizer.encode_src(src, threads=1), tokenizer.encode_tgt(tgt, threads=1)
    src_lens = np.fromiter(map(len, src_ids), np.int64, count=len(src_ids))
    tgt_lens = np.fromiter(map(len, tgt_ids), np.int64, count=len(tgt_ids))
    keep, n_long, n_ratio = length_filter(src_lens, tgt_lens, _worker["max_len"], _worker["max_ratio"])
    stats = {"read": len(chunk[0]), "kept": int(keep.sum()), "empty": n_empty, "unreadable": n_unreadable,
             "max_len": n_long, "max_len_ratio": n_ratio}
    kept = [(s, t, si, ti) for s, t, si, ti, k in zip(src, tgt, src_ids, tgt_ids, keep.tolist(), strict=True) if k]
    sets = [_arrays([row[2] for row in kept], [row[3] for row in kept])]
    for k in range(_worker["sampled"]):
        sets.append(_arrays(*_sampled(tokenizer, kept, np.random.default_rng([k, index]))))
    return sets, stats


def _sampled(tokenizer: Tokenizer, kept: list[tuple[str, str, list[int], list[int]]],
             rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """One sampled segmentation of the kept pairs, drawn from ``rng`` (seeded by sample and chunk,
    so the cache is the same bytes however many workers encode it). A side sampled longer than
    ``data.max_len`` keeps its deterministic ids: every epoch's sentences fit the model."""
    alpha, max_len = _worker["alpha"], _worker["max_len"]
    src = tokenizer.sample_src([row[0] for row in kept], alpha, rng)
    tgt = tokenizer.sample_tgt([row[1] for row in kept], alpha, rng)
    return ([s if len(s) <= max_len else row[2] for s, row in zip(src, kept, strict=True)],
            [t if len(t) <= max_len else row[3] for t, row in zip(tgt, kept, strict=True)])


def _arrays(src_ids: list[list[int]], tgt_ids: list[list[int]]) -> Arrays:
    return (_flat(src_ids, _worker["dtype"]), _lengths(src_ids), _flat(tgt_ids, _worker["dtype"]), _lengths(tgt_ids))


def _lengths(ids: list[list[int]]) -> np.ndarray:
    return np.fromiter(map(len, ids), np.int32, count=len(ids))


def _flat(ids: list[list[int]], dtype: np.dtype) -> np.ndarray:
    return np.fromiter((i for row in ids for i in row), dtype, count=sum(map(len, ids)))


class _Writer:
    """Appends token chunks to ``{name}.bin`` and their lengths to a scratch file; on a clean exit
    the offsets are computed block by block from that file, so nothing per sentence stays in memory."""

    def __init__(self, out: Path, name: str, dtype: type) -> None:
        self.out, self.name, self.dtype = out, name, np.dtype(dtype)
        self.n = 0

    def __enter__(self) -> _Writer:
        self.file = open(self.out / f"{self.name}.bin", "wb")  # noqa: SIM115
        self.lengths = open(self.out / f"{self.name}.lengths.tmp", "wb")  # noqa: SIM115
        return self

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens.astype(self.dtype, copy=False).tofile(self.file)
        lengths.astype(np.int32, copy=False).tofile(self.lengths)
        self.n += len(lengths)

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.lengths.close()
        scratch = self.out / f"{self.name}.lengths.tmp"
        if exc[0] is None:
            self._write_offsets(scratch)
        scratch.unlink(missing_ok=True)

    def _write_offsets(self, scratch: Path) -> None:
        """``offsets.npy`` summed block by block with plain reads and writes: a memory map of the
        output would count every page written in this process's RSS, which grows with the corpus."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)), "fortran_order": False,
                  "shape": (self.n + 1,)}
        with open(self.out / f"{self.name}.offsets.npy", "wb") as out, open(scratch, "rb") as lengths:
            np.lib.format.write_array_header_1_0(out, header)
            np.zeros(1, np.int64).tofile(out)
            total = 0
            while (block := np.fromfile(lengths, np.int32, count=OFFSET_BLOCK)).size:
                sums = np.cumsum(block, dtype=np.int64)
                sums += total
                sums.tofile(out)
                total = int(sums[-1])


def _progress(chunks: Iterator[Chunk], desc: str) -> Iterator[Chunk]:
    """Pass the chunks through, with a lines/s progress bar on a terminal."""
    with tqdm(desc=desc, unit=" pairs", unit_scale=True, disable=not sys.stderr.isatty()) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk[0]))


def encode_array(encode: Callable[[list[str]], list[list[int]]], lines: Sequence[str],
                 dtype: type, desc: str) -> TokenArray:
    """Encode in chunks into one flat array, so no corpus-sized list of Python ints is held."""
    show = len(lines) >= PROGRESS_MIN and sys.stderr.isatty()
    datas, lens = [np.zeros(0, dtype)], [np.zeros(0, np.int64)]
    with tqdm(total=len(lines), desc=desc, unit="sent", disable=not show) as bar:
        for i in range(0, len(lines), ENCODE_CHUNK):
            ids = encode(list(lines[i:i + ENCODE_CHUNK]))
            n = np.fromiter(map(len, ids), np.int64, count=len(ids))
            datas.append(np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(n.sum())))
            lens.append(n)
            bar.update(len(ids))
    return TokenArray.from_lengths(np.concatenate(datas), np.concatenate(lens))
