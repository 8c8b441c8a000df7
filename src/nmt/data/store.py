"""Token arrays on disk: ragged integer arrays memory-mapped from a cache folder, and the
splits (source and target arrays, raw text of the small splits) that a prepared corpus holds."""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer

RELEASE_MIN = 64 << 20  # bytes: larger cache files give their pages back after each read
LENGTHS_BLOCK = 1 << 20  # sentences per read when lengths are computed from a cache file


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _release(maps: Sequence[mmap.mmap]) -> None:
    """Drop this process's page table entries of ``maps``: the pages stay in the page cache (a
    later read faults them back cheaply), but no longer count in this process's RSS. Without this,
    every page a batch touches stays mapped (with the kernel's fault-around, about 64 KiB per
    random sentence), and RSS grows towards the size of the corpus. Maps up to ``RELEASE_MIN``
    bytes keep their pages: faulting them back would cost more than holding them."""
    for m in maps:
        if len(m) > RELEASE_MIN:
            m.madvise(mmap.MADV_DONTNEED)


class CorruptCacheError(Exception):
    """A prepared folder whose files disagree with each other or with ``meta.json`` (a file cut short
    by a crash, overwritten or removed): never read as data."""


@dataclass
class TokenArray:
    """Ragged int arrays: sentence ``i`` is ``data[offsets[i]:offsets[i + 1]]``."""

    data: np.ndarray  # uint16 or int32, memory-mapped from the cache
    offsets: np.ndarray  # int64, len = n + 1
    maps: tuple[mmap.mmap, ...] = ()  # the cache files under data and offsets, released after reads

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self, dtype: type = np.int64) -> np.ndarray:
        """Tokens per sentence, without BOS/EOS; a memory-mapped cache is read block by block."""
        if not self.maps:
            return np.diff(self.offsets).astype(dtype, copy=False)
        out = np.empty(len(self), dtype)
        for i in range(0, len(self), LENGTHS_BLOCK):
            out[i:i + LENGTHS_BLOCK] = np.diff(self.offsets[i:i + LENGTHS_BLOCK + 1])
            _release(self.maps)
        return out

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sentences ``idx`` gathered at once (no per-row loop): lengths [B] (int64), mask
        [B, max_len] (True where row r has a token at column c) and the tokens in row-major mask
        order, copied out of the cache."""
        starts = self.offsets[idx]
        lens = self.offsets[idx + 1] - starts
        cols = np.arange(int(lens.max(initial=0)))
        mask = cols < lens[:, None]
        tokens = self.data[(starts[:, None] + cols)[mask]]
        _release(self.maps)
        return lens, mask, tokens

    @classmethod
    def from_lengths(cls, data: np.ndarray, lengths: np.ndarray) -> TokenArray:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(data, offsets)

    def select(self, keep: np.ndarray) -> TokenArray:
        """Sentences where the boolean mask ``keep`` is true."""
        lengths = self.lengths()
        return TokenArray.from_lengths(self.data[np.repeat(keep, lengths)], lengths[keep])

    def truncate(self, max_len: int) -> TokenArray:
        """Every sentence cut to its first ``max_len`` tokens."""
        lengths = self.lengths()
        if lengths.size == 0 or lengths.max() <= max_len:
            return self
        starts = self.offsets[:-1]
        keep = np.arange(len(self.data)) - np.repeat(starts, lengths) < max_len
        return TokenArray.from_lengths(self.data[keep], np.minimum(lengths, max_len))

    def save(self, directory: Path, name: str) -> None:
        self.data.tofile(directory / f"{name}.bin")
        np.save(directory / f"{name}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, directory: Path, name: str, dtype: str) -> TokenArray:
        """Memory-map ``{name}.bin`` (raw tokens of ``dtype``, no header: the training split is
        written by appending chunks) and ``{name}.offsets.npy``. CorruptCacheError when the files
        disagree: offsets that do not start at 0, or a ``.bin`` of another size than the last offset
        says (a file cut short by a crash is never read as data)."""
        path = directory / f"{name}.offsets.npy"
        try:
            header = np.load(path, mmap_mode="r")  # for the header's length and the shape
        except (OSError, ValueError) as e:
            raise CorruptCacheError(f"{path}: {e}") from None
        if header.dtype != np.int64 or header.ndim != 1 or len(header) == 0 or header[0] != 0:
            raise CorruptCacheError(f"{path}: not an offsets array")
        offsets_map = _map(path)
        offsets = np.frombuffer(offsets_map, np.int64, count=len(header), offset=header.offset)
        bin_path = directory / f"{name}.bin"
        size = bin_path.stat().st_size if bin_path.is_file() else -1
        if size != int(offsets[-1]) * np.dtype(dtype).itemsize:
            raise CorruptCacheError(f"{bin_path}: {size} bytes, the offsets say {int(offsets[-1])} "
                                    f"tokens of {dtype}")
        if offsets[-1] == 0:  # mmap refuses empty files
            return cls(np.zeros(0, dtype), offsets, (offsets_map,))
        data_map = _map(bin_path)
        return cls(np.frombuffer(data_map, dtype), offsets, (data_map, offsets_map))


@dataclass
class ParallelData:
    src: TokenArray
    tgt: TokenArray
    src_text: list[str] | None = None  # raw lines (valid/test only)
    tgt_text: list[str] | None = None

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: ParallelData
    valid: ParallelData
    test: ParallelData | None
    cache_dir: Path | None = None
    train_samples: list[ParallelData] = field(default_factory=list)  # sampled segmentations of train

    def train_for_epoch(self, epoch: int) -> ParallelData:
        """The training split as epoch ``epoch`` sees it: sampled segmentation ``epoch mod K`` when
        there are K, else the deterministic one."""
        if not self.train_samples:
            return self.train
        return self.train_samples[epoch % len(self.train_samples)]


# ---------------------------------------------------------------- a prepared folder


def save_splits(out: Path, splits: dict[str, ParallelData], meta: dict[str, Any]) -> None:
    """``{name}.{src,tgt}.{bin,offsets.npy}`` (and ``{name}.text.json`` for splits with text) of each
    split, then ``meta.json``, which lists the splits: a folder without it is incomplete. Any named
    array set (a split, or another segmentation of one) is stored and listed the same way."""
    for name, data in splits.items():
        data.src.save(out, f"{name}.src")
        data.tgt.save(out, f"{name}.tgt")
        if data.src_text is not None:
            text = json.dumps({"src": data.src_text, "tgt": data.tgt_text}, ensure_ascii=False)
            (out / f"{name}.text.json").write_text(text, encoding="utf-8")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def load_split(folder: Path, name: str, dtype: str) -> ParallelData:
    data = ParallelData(TokenArray.load(folder, f"{name}.src", dtype),
                        TokenArray.load(folder, f"{name}.tgt", dtype))
    text_path = folder / f"{name}.text.json"
    if text_path.is_file():
        text = json.loads(text_path.read_text(encoding="utf-8"))
        data.src_text, data.tgt_text = text["src"], text["tgt"]
    return data


def load_prepared_folder(folder: Path) -> PreparedData:
    """Memory-map the arrays of a complete prepared folder, after checking that every file holds
    what ``meta.json`` says: CorruptCacheError otherwise."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        splits = {name: load_split(folder, name, meta["dtype"]) for name in meta["splits"]}
        tokenizer = Tokenizer.load(folder / "tokenizer")
    except (OSError, ValueError, KeyError, TypeError, NMTError) as e:
        raise CorruptCacheError(f"{type(e).__name__}: {e}") from None
    for name, data in splits.items():
        _check_counts(name, data, meta)
    samples = [data for name, data in splits.items() if name.startswith("train.sample")]
    return PreparedData(tokenizer, splits["train"], splits["valid"], splits.get("test"), folder, samples)


def _check_counts(name: str, data: ParallelData, meta: dict[str, Any]) -> None:
    tokens = [int(data.src.offsets[-1]), int(data.tgt.offsets[-1])]
    if len(data.src) != meta["pairs"][name] or len(data.tgt) != meta["pairs"][name]:
        raise CorruptCacheError(f"{name}: {len(data.src)}/{len(data.tgt)} sentences, meta.json says "
                                f"{meta['pairs'][name]}")
    if tokens != meta["tokens"][name]:
        raise CorruptCacheError(f"{name}: {tokens} tokens, meta.json says {meta['tokens'][name]}")
    if data.src_text is not None and not len(data.src_text) == len(data.tgt_text or ()) == len(data.src):
        raise CorruptCacheError(f"{name}: text lines do not match the arrays")
