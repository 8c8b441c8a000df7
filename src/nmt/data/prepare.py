"""Corpus -> cleaned, tokenized, binarized splits, cached under ``{run_dir}/data/<key>/``."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nmt.config import Config, DataConfig
from nmt.data.corpus import corpus_fingerprint, local_paths, read_split
from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer

CACHE_FORMAT = 1
ENCODE_CHUNK = 50_000  # sentences per encode call: bounds Python-list memory on large corpora
PROGRESS_MIN = 200_000  # show a progress bar only for corpora at least this large

Log = Callable[[str], None]


@dataclass
class TokenArray:
    """Ragged int arrays: sentence ``i`` is ``data[offsets[i]:offsets[i + 1]]``."""

    data: np.ndarray  # uint16 or int32, memory-mapped from the cache
    offsets: np.ndarray  # int64, len = n + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """Tokens per sentence (int64), without BOS/EOS."""
        return np.diff(self.offsets)

    @classmethod
    def from_lengths(cls, data: np.ndarray, lengths: np.ndarray) -> TokenArray:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(data, offsets)

    def select(self, keep: np.ndarray) -> TokenArray:
        """Sentences where the boolean mask ``keep`` is true."""
        lengths = self.lengths()
        return TokenArray.from_lengths(self.data[np.repeat(keep, lengths)], lengths[keep])

    def save(self, directory: Path, name: str) -> None:
        np.save(directory / f"{name}.npy", self.data)
        np.save(directory / f"{name}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, directory: Path, name: str) -> TokenArray:
        return cls(np.load(directory / f"{name}.npy", mmap_mode="r"),
                   np.load(directory / f"{name}.offsets.npy", mmap_mode="r"))


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


def prepare_data(cfg: Config, log: Log = print, tokenizer: Tokenizer | None = None,
                 write_run_files: bool = True) -> PreparedData:
    """Read, clean, tokenize and binarize all splits, or load them from the cache.

    ``tokenizer``: encode with this one (a fine-tuning parent's) instead of training a new one.
    ``write_run_files``: False on the other ranks of a distributed run, which only read what rank 0 wrote.
    """
    start = time.perf_counter()
    root = Path(cfg.run_dir) / "data"
    cache = root / cache_key(cfg, tokenizer)
    if _is_complete(cache):
        log(f"using cached data {cache} (reading and tokenization skipped)")
    else:
        _build_cache(cfg, root, cache, log, tokenizer)
    prepared = load_cache(cache)
    if write_run_files:
        prepared.tokenizer.save(Path(cfg.run_dir) / "tokenizer")
    meta = json.loads((cache / "meta.json").read_text())
    for line in _stats_lines(meta):
        log(line)
    log(f"data ready in {time.perf_counter() - start:.1f} s")
    return prepared


def has_test(data_cfg: DataConfig) -> bool:
    """A test split is configured (empty ``data.test`` / ``data.hf_test_split`` turns it off)."""
    return bool(data_cfg.test if data_cfg.dir else data_cfg.hf_test_split)


def cache_key(cfg: Config, tokenizer: Tokenizer | None = None) -> str:
    """Hash of everything the cached arrays depend on (a given tokenizer by its model bytes)."""
    d = cfg.data
    splits = ["train", "valid"] + (["test"] if has_test(d) else [])
    inputs = {
        "format": CACHE_FORMAT,
        "corpus": {s: corpus_fingerprint(d, s) for s in splits},
        "langs": [d.src_lang, d.tgt_lang],
        "cleaning": [d.max_len, d.max_len_ratio],
        "tokenizer": dataclasses.asdict(cfg.tokenizer),
    }
    if tokenizer is not None:
        inputs["given_tokenizer"] = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(tokenizer.to_state().items())}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _is_complete(cache: Path) -> bool:
    return (cache / "meta.json").is_file()  # meta.json is written last


def load_cache(cache: Path) -> PreparedData:
    """Memory-map the arrays of a complete cache directory."""
    meta = json.loads((cache / "meta.json").read_text())
    splits = {name: _load_split(cache, name) for name in meta["splits"]}
    return PreparedData(Tokenizer.load(cache / "tokenizer"), splits["train"], splits["valid"],
                        splits.get("test"), cache)


def _load_split(cache: Path, name: str) -> ParallelData:
    data = ParallelData(TokenArray.load(cache, f"{name}.src"), TokenArray.load(cache, f"{name}.tgt"))
    text_path = cache / f"{name}.text.json"
    if text_path.is_file():
        text = json.loads(text_path.read_text(encoding="utf-8"))
        data.src_text, data.tgt_text = text["src"], text["tgt"]
    return data


# ---------------------------------------------------------------- building


def _build_cache(cfg: Config, root: Path, cache: Path, log: Log, tokenizer: Tokenizer | None = None) -> None:
    """Build into a temporary folder, then rename it: an interrupted build is never used."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{cache.name}-"))
    try:
        _write_splits(cfg, tmp, log, tokenizer)
        _publish(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, cache: Path) -> None:
    if cache.exists() and not _is_complete(cache):
        shutil.rmtree(cache)  # leftover without meta.json: not a usable cache
    try:
        os.rename(tmp, cache)
    except OSError:
        if not _is_complete(cache):  # another process published the same key meanwhile
            raise


def _write_splits(cfg: Config, out: Path, log: Log, tokenizer: Tokenizer | None = None) -> None:
    d = cfg.data
    names = ["train", "valid"] + (["test"] if has_test(d) else [])
    texts = {name: read_split(d, name) for name in names}
    log("read " + ", ".join(f"{n} {len(texts[n][0])} pairs" for n in names))
    for name in ("train", "valid"):  # fail now, not at the first validation after hours of training
        if not texts[name][0]:
            where = " ({} and {})".format(*local_paths(d, name)) if d.dir else ""
            raise NMTError(f"the {name} split is empty: no lines{where}")
    src, tgt, n_empty = drop_empty(*texts["train"])
    if not src:
        raise NMTError(f"training corpus is empty after cleaning ({n_empty} empty pairs dropped)")

    if tokenizer is None:
        t0 = time.perf_counter()
        tokenizer = Tokenizer.train(src, tgt, cfg.tokenizer)
        log(f"trained {'joint' if tokenizer.joint else 'separate'} {cfg.tokenizer.model_type} "
            f"tokenizer in {time.perf_counter() - t0:.1f} s")
    tokenizer.save(out / "tokenizer")
    dtype = np.uint16 if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 65536 else np.int32

    train = ParallelData(encode_array(tokenizer.encode_src, src, dtype, "encode train src"),
                         encode_array(tokenizer.encode_tgt, tgt, dtype, "encode train tgt"))
    keep, n_long, n_ratio = length_filter(train.src.lengths(), train.tgt.lengths(),
                                          d.max_len, d.max_len_ratio)
    if not keep.any():
        raise NMTError(f"training corpus is empty after cleaning (all pairs over data.max_len="
                       f"{d.max_len} tokens or data.max_len_ratio={d.max_len_ratio})")
    splits = {"train": ParallelData(train.src.select(keep), train.tgt.select(keep))}
    for name in names[1:]:
        s, t = texts[name]
        splits[name] = ParallelData(encode_array(tokenizer.encode_src, s, dtype, f"encode {name} src"),
                                    encode_array(tokenizer.encode_tgt, t, dtype, f"encode {name} tgt"),
                                    s, t)
    dropped = {"empty": n_empty, "max_len": n_long, "max_len_ratio": n_ratio}
    _save_splits(out, splits, _meta(cfg, tokenizer, splits, len(texts["train"][0]), dropped))


def _save_splits(out: Path, splits: dict[str, ParallelData], meta: dict[str, Any]) -> None:
    for name, data in splits.items():
        data.src.save(out, f"{name}.src")
        data.tgt.save(out, f"{name}.tgt")
        if data.src_text is not None:
            text = json.dumps({"src": data.src_text, "tgt": data.tgt_text}, ensure_ascii=False)
            (out / f"{name}.text.json").write_text(text, encoding="utf-8")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _meta(cfg: Config, tokenizer: Tokenizer, splits: dict[str, ParallelData], n_read: int,
          dropped: dict[str, int]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "splits": list(splits),
        "tokenizer": dataclasses.asdict(cfg.tokenizer),
        "vocab": {"src": tokenizer.src_vocab_size, "tgt": tokenizer.tgt_vocab_size},
        "train_read": n_read,
        "dropped": dropped,
        "cleaning": {"max_len": cfg.data.max_len, "max_len_ratio": cfg.data.max_len_ratio},
        "pairs": {n: len(p) for n, p in splits.items()},
        "tokens": {n: [int(p.src.offsets[-1]), int(p.tgt.offsets[-1])] for n, p in splits.items()},
    }


def _stats_lines(meta: dict[str, Any]) -> list[str]:
    drop, clean = meta["dropped"], meta["cleaning"]
    lines = [
        f"train: kept {meta['pairs']['train']} of {meta['train_read']} pairs; dropped "
        f"{drop['empty']} empty, {drop['max_len']} over data.max_len={clean['max_len']}, "
        f"{drop['max_len_ratio']} over data.max_len_ratio={clean['max_len_ratio']}",
        f"vocab: src {meta['vocab']['src']}, tgt {meta['vocab']['tgt']} "
        f"({'joint' if meta['tokenizer']['joint'] else 'separate'} {meta['tokenizer']['model_type']})",
    ]
    for name, (n_src, n_tgt) in meta["tokens"].items():
        lines.append(f"{name}: {meta['pairs'][name]} pairs, {n_src} src / {n_tgt} tgt tokens")
    return lines


def drop_empty(src: Sequence[str], tgt: Sequence[str]) -> tuple[list[str], list[str], int]:
    """Strip both sides; drop pairs where either side is empty. Returns (src, tgt, n_dropped)."""
    stripped = zip((s.strip() for s in src), (t.strip() for t in tgt), strict=True)
    pairs = [(s, t) for s, t in stripped if s and t]
    kept_src = [s for s, _ in pairs]
    kept_tgt = [t for _, t in pairs]
    return kept_src, kept_tgt, len(src) - len(pairs)


def length_filter(src_lens: np.ndarray, tgt_lens: np.ndarray, max_len: int,
                  max_ratio: float) -> tuple[np.ndarray, int, int]:
    """Keep mask, number over ``max_len`` on either side, number over the length ratio."""
    too_long = (src_lens > max_len) | (tgt_lens > max_len)
    longer = np.maximum(src_lens, tgt_lens)
    shorter = np.maximum(np.minimum(src_lens, tgt_lens), 1)
    bad_ratio = ~too_long & (longer > max_ratio * shorter)
    keep = ~(too_long | bad_ratio)
    return keep, int(too_long.sum()), int(bad_ratio.sum())


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
