"""Corpus -> cleaned, tokenized, binarized splits, cached under ``{data.cache_dir}/<key>/``."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import mmap
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nmt.config import Config, DataConfig
from nmt.data.corpus import corpus_fingerprint, iter_split, local_paths, read_split
from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer

CACHE_FORMAT = 2
ENCODE_CHUNK = 50_000  # sentences per encode call: bounds Python-list memory on large corpora
PROGRESS_MIN = 200_000  # show a progress bar only for corpora at least this large
APART_MIN = 20_000  # training pairs above which SentencePiece trains in a process of its own
RELEASE_MIN = 64 << 20  # bytes: larger cache files give their pages back after each read
LENGTHS_BLOCK = 1 << 20  # sentences per read when lengths are computed from a cache file

Log = Callable[[str], None]


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _release(maps: Sequence[mmap.mmap]) -> None:
    """Drop this process's page table entries of ``maps``: the pages stay in the page cache (a
    later read faults them back cheaply), but no longer count in this process's RSS. Without this,
    every page a batch touches stays mapped (with the kernel's fault-around, about 64 KiB per
    random sentence), and RSS grows towards the size of the corpus. Maps up to ``RELEASE_MIN``
    bytes keep their pages: faulting them back costs more than holding them (a few ms a batch)."""
    for m in maps:
        if len(m) > RELEASE_MIN:
            m.madvise(mmap.MADV_DONTNEED)


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
        written by appending chunks) and ``{name}.offsets.npy``."""
        path = directory / f"{name}.offsets.npy"
        header = np.load(path, mmap_mode="r")  # for the header's length and the shape
        offsets_map = _map(path)
        offsets = np.frombuffer(offsets_map, np.int64, count=len(header), offset=header.offset)
        if offsets[-1] == 0:  # mmap refuses empty files
            return cls(np.zeros(0, dtype), offsets, (offsets_map,))
        data_map = _map(directory / f"{name}.bin")
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


def prepare_data(cfg: Config, log: Log = print, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read, clean, tokenize and binarize all splits, or load them from the shared cache.

    ``tokenizer``: use this trained tokenizer instead of training one on the corpus (it then keys
    the cache in place of the ``tokenizer`` settings).
    """
    start = time.perf_counter()
    root = cache_root(cfg.data)
    cache = root / cache_key(cfg, tokenizer)
    if _is_complete(cache):
        log(f"using cached data {cache} (reading and tokenization skipped)")
    else:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f"{cache.name}.lock", log):
            if _is_complete(cache):  # another run prepared it while this one waited
                log(f"using cached data {cache}, prepared by another run")
            else:
                _build_cache(cfg, root, cache, log, tokenizer)
                log(f"cached data in {cache}")
    prepared = load_cache(cache)
    prepared.tokenizer.save(Path(cfg.run_dir) / "tokenizer")
    meta = json.loads((cache / "meta.json").read_text())
    for line in _stats_lines(meta):
        log(line)
    log(f"data ready in {time.perf_counter() - start:.1f} s")
    return prepared


def load_prepared(cfg: Config, tokenizer: Tokenizer | None = None) -> PreparedData:
    """The cache that ``prepare_data`` built for ``cfg``, memory-mapped; nothing is built."""
    cache = cache_root(cfg.data) / cache_key(cfg, tokenizer)
    if not _is_complete(cache):
        raise NMTError(f"no prepared data in {cache}: data.cache_dir must be shared by all processes")
    return load_cache(cache)


def cache_root(data_cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$XDG_CACHE_HOME/nmt/data`` (``~/.cache/nmt/data``)."""
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmt" / "data"


@contextlib.contextmanager
def _locked(path: Path, log: Log) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: one process builds a cache, the others wait for it.
    The kernel drops the lock when its holder dies, so a killed build blocks nobody."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run preparing the same data ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def has_test(data_cfg: DataConfig) -> bool:
    """A test split is configured (empty ``data.test`` / ``data.hf_test_split`` turns it off)."""
    return bool(data_cfg.test if data_cfg.dir else data_cfg.hf_test_split)


def cache_key(cfg: Config, tokenizer: Tokenizer | None = None) -> str:
    """Hash of everything the cached arrays depend on (the given ``tokenizer``'s models, if any)."""
    d = cfg.data
    splits = ["train", "valid"] + (["test"] if has_test(d) else [])
    inputs = {
        "format": CACHE_FORMAT,
        "corpus": {s: corpus_fingerprint(d, s) for s in splits},
        "langs": [d.src_lang, d.tgt_lang],
        "cleaning": [d.max_len, d.max_len_ratio],
        "tokenizer": dataclasses.asdict(cfg.tokenizer) if tokenizer is None else _models_hash(tokenizer),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _models_hash(tokenizer: Tokenizer) -> str:
    state = tokenizer.to_state()
    return hashlib.sha256(b"".join(name.encode() + state[name] for name in sorted(state))).hexdigest()


def _is_complete(cache: Path) -> bool:
    return (cache / "meta.json").is_file()  # meta.json is written last


def load_cache(cache: Path) -> PreparedData:
    """Memory-map the arrays of a complete cache directory."""
    meta = json.loads((cache / "meta.json").read_text())
    splits = {name: _load_split(cache, name, meta["dtype"]) for name in meta["splits"]}
    return PreparedData(Tokenizer.load(cache / "tokenizer"), splits["train"], splits["valid"],
                        splits.get("test"), cache)


def _load_split(cache: Path, name: str, dtype: str) -> ParallelData:
    data = ParallelData(TokenArray.load(cache, f"{name}.src", dtype),
                        TokenArray.load(cache, f"{name}.tgt", dtype))
    text_path = cache / f"{name}.text.json"
    if text_path.is_file():
        text = json.loads(text_path.read_text(encoding="utf-8"))
        data.src_text, data.tgt_text = text["src"], text["tgt"]
    return data


# ---------------------------------------------------------------- building


def _build_cache(cfg: Config, root: Path, cache: Path, log: Log, tokenizer: Tokenizer | None) -> None:
    """Build into a temporary folder, then rename it: an interrupted build is never used."""
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


def _write_splits(cfg: Config, out: Path, log: Log, tokenizer: Tokenizer | None) -> None:
    d = cfg.data
    names = ["train", "valid"] + (["test"] if has_test(d) else [])
    texts = {name: read_split(d, name) for name in names[1:]}  # small: held whole for BLEU
    first = next(iter_split(d, "train", chunk=1), None)
    # fail now, not at the first validation after hours of training
    for name, empty in (("train", first is None), ("valid", not texts["valid"][0])):
        if empty:
            where = " ({} and {})".format(*local_paths(d, name)) if d.dir else ""
            raise NMTError(f"the {name} split is empty: no lines{where}")
    if tokenizer is None:
        t0 = time.perf_counter()
        tokenizer = _train_tokenizer(cfg)
        log(f"trained {'joint' if tokenizer.joint else 'separate'} {cfg.tokenizer.model_type} "
            f"tokenizer in {time.perf_counter() - t0:.1f} s")
    tokenizer.save(out / "tokenizer")
    dtype = np.uint16 if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 65536 else np.int32
    from nmt.data.encode import encode_train  # imports this module's helpers

    counts = encode_train(cfg, tokenizer, out, dtype)
    if counts["kept"] == 0:
        raise NMTError(f"training corpus is empty after cleaning ({counts['empty']} empty pairs, "
                       f"{counts['max_len']} over data.max_len={d.max_len}, {counts['max_len_ratio']} "
                       f"over data.max_len_ratio={d.max_len_ratio} dropped)")
    splits = {"train": _load_split(out, "train", np.dtype(dtype).name)}
    truncated = {}
    for name in names[1:]:
        s, t = texts[name]
        src = encode_array(tokenizer.encode_src, s, dtype, f"encode {name} src")
        tgt = encode_array(tokenizer.encode_tgt, t, dtype, f"encode {name} tgt")
        src, tgt, truncated[name] = truncate_pairs(src, tgt, d.max_len)
        splits[name] = ParallelData(src, tgt, s, t)
    dropped = {k: counts[k] for k in ("empty", "max_len", "max_len_ratio")}
    _save_splits(out, {k: v for k, v in splits.items() if k != "train"},
                 _meta(cfg, tokenizer, splits, counts["read"], dropped, truncated))


def _train_tokenizer(cfg: Config) -> Tokenizer:
    """SentencePiece on a sample of the cleaned training split, streamed. A corpus of more than
    one chunk is sampled and trained in a process of its own: SentencePiece's memory (its sample
    and training state) then goes back to the system, instead of staying in this process's heap
    under the encoding that follows."""
    if next(itertools.islice(iter_split(cfg.data, "train", chunk=APART_MIN), 1, None), None) is None:
        return _train_tokenizer_here(cfg)
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # spawn: see encode_train
        return Tokenizer.from_state(pool.apply(_tokenizer_state, (cfg,)))


def _tokenizer_state(cfg: Config) -> dict[str, bytes]:
    return _train_tokenizer_here(cfg).to_state()


def _train_tokenizer_here(cfg: Config) -> Tokenizer:
    counts = {"kept": 0, "empty": 0}
    errors: list[BaseException] = []  # SentencePiece would swallow an exception of the reader

    def chunks() -> Iterator[tuple[list[str], list[str]]]:
        counts.update(kept=0, empty=0)
        try:
            for src, tgt in iter_split(cfg.data, "train"):
                src, tgt, n_empty = drop_empty(src, tgt)
                counts["kept"] += len(src)
                counts["empty"] += n_empty
                yield src, tgt
        except Exception as e:
            errors.append(e)

    try:
        tokenizer = Tokenizer.train_streaming(chunks, cfg.tokenizer)
    except NMTError:
        if errors:
            raise errors[0] from None
        if counts["kept"] == 0:
            raise NMTError(f"training corpus is empty after cleaning ({counts['empty']} empty pairs "
                           "dropped)") from None
        raise
    if errors:
        raise errors[0]
    return tokenizer


def truncate_pairs(src: TokenArray, tgt: TokenArray, max_len: int) -> tuple[TokenArray, TokenArray, int]:
    """Both sides cut to ``max_len`` tokens (for the loss: decoding reads the raw text), and the
    number of pairs cut."""
    too_long = (src.lengths() > max_len) | (tgt.lengths() > max_len)
    return src.truncate(max_len), tgt.truncate(max_len), int(too_long.sum())


def _save_splits(out: Path, splits: dict[str, ParallelData], meta: dict[str, Any]) -> None:
    for name, data in splits.items():
        data.src.save(out, f"{name}.src")
        data.tgt.save(out, f"{name}.tgt")
        if data.src_text is not None:
            text = json.dumps({"src": data.src_text, "tgt": data.tgt_text}, ensure_ascii=False)
            (out / f"{name}.text.json").write_text(text, encoding="utf-8")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _meta(cfg: Config, tokenizer: Tokenizer, splits: dict[str, ParallelData], n_read: int,
          dropped: dict[str, int], truncated: dict[str, int]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "splits": list(splits),
        "dtype": splits["train"].src.data.dtype.name,
        "tokenizer": dataclasses.asdict(cfg.tokenizer),
        "vocab": {"src": tokenizer.src_vocab_size, "tgt": tokenizer.tgt_vocab_size},
        "train_read": n_read,
        "dropped": dropped,
        "truncated": truncated,
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
        cut = meta["truncated"].get(name, 0)
        note = f"; {cut} longer than data.max_len={clean['max_len']} cut to it for the loss" if cut else ""
        lines.append(f"{name}: {meta['pairs'][name]} pairs, {n_src} src / {n_tgt} tgt tokens{note}")
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
