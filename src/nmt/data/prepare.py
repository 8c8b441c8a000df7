"""Corpus -> cleaned, tokenized, binarized splits, cached under ``{data.cache_dir}/<key>/``: the
steps in order (cache lookup, tokenizer, encoding, statistics), each done by its own module."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nmt.config import Config
from nmt.data.cache import (
    CACHE_FORMAT,
    building,
    cache_key,
    cache_root,
    discard,
    is_complete,
    locked,
    sweep,
)
from nmt.data.clean import truncate_pairs
from nmt.data.corpus import has_test, iter_split, local_paths, mono_path, mono_side, read_split
from nmt.data.encode import encode_array, encode_train, train_sets
from nmt.data.stats import build_meta, stats_lines
from nmt.data.store import (
    CorruptCacheError,
    ParallelData,
    PreparedData,
    TokenArray,
    load_prepared_folder,
    load_split,
    save_splits,
)
from nmt.data.tokenizer_training import train_tokenizer
from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer

__all__ = ["ParallelData", "PreparedData", "TokenArray", "cache_key", "load_prepared", "prepare_data",
           "prepare_on_each_machine"]

Log = Callable[[str], None]


def prepare_data(cfg: Config, log: Log = print, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read, clean, tokenize and binarize all splits, or load them from the shared cache.

    ``tokenizer``: use this trained tokenizer instead of training one on the corpus (it then keys
    the cache in place of the ``tokenizer`` settings).
    """
    start = time.perf_counter()
    root = cache_root(cfg.data)
    cache = root / cache_key(cfg, tokenizer)
    sweep(root, log)
    prepared = _open(cache, log)
    if prepared is not None:
        log(f"using cached data {cache} (reading and tokenization skipped)")
    else:
        root.mkdir(parents=True, exist_ok=True)
        with locked(root / f"{cache.name}.lock", log):
            prepared = _open(cache, lambda _: None)  # corruption was said above
            if prepared is not None:  # another run prepared it while this one waited
                log(f"using cached data {cache}, prepared by another run")
            else:
                discard(cache)
                with building(root, cache.name) as tmp:
                    _write_splits(cfg, tmp, log, tokenizer)
                log(f"cached data in {cache}")
                prepared = load_prepared_folder(cache)
    prepared.tokenizer.save(Path(cfg.run_dir) / "tokenizer")
    for line in stats_lines(_read_meta(cache)):
        log(line)
    log(f"data ready in {time.perf_counter() - start:.1f} s")
    return prepared


def prepare_on_each_machine(cfg: Config, local_rank: int, wait: Callable[[], None], log: Log = print,
                            tokenizer: Tokenizer | None = None) -> PreparedData:
    """The data of one process of a multi-process run. The first process on each machine
    (``local_rank`` 0) prepares the cache in that machine's ``data.cache_dir``, or finds it there
    (keys follow content, so every machine computes the same key, and builders on a shared folder
    take turns under its lock); the other processes wait until ``wait`` (a barrier of all
    processes) returns, then memory-map it."""
    data = prepare_data(cfg, log=log, tokenizer=tokenizer) if local_rank == 0 else None
    wait()
    return data if data is not None else load_prepared(cfg, tokenizer=tokenizer)


def load_prepared(cfg: Config, tokenizer: Tokenizer | None = None) -> PreparedData:
    """The cache that ``prepare_data`` built for ``cfg``, memory-mapped; nothing is built."""
    cache = cache_root(cfg.data) / cache_key(cfg, tokenizer)
    if not is_complete(cache):
        raise NMTError(f"no prepared data in {cache}: the first process of each machine prepares it, "
                       "so data.cache_dir must be shared by the processes of a machine")
    try:
        return load_prepared_folder(cache)
    except CorruptCacheError as e:
        raise NMTError(f"prepared data in {cache} is corrupt ({e}): run nmt prepare again") from None


def _open(cache: Path, log: Log) -> PreparedData | None:
    """The cache at ``cache``, or None when there is none or it is corrupt (which is said)."""
    if not is_complete(cache):
        return None
    try:
        return load_prepared_folder(cache)
    except CorruptCacheError as e:
        log(f"warning: cached data in {cache} is corrupt ({e}); rebuilding it")
        return None


def _read_meta(cache: Path) -> dict:
    return json.loads((cache / "meta.json").read_text())


def _write_splits(cfg: Config, out: Path, log: Log, tokenizer: Tokenizer | None) -> None:
    d, side = cfg.data, mono_side(cfg)
    names = ["train", "valid"] + (["test"] if has_test(d, side) else [])
    texts = {name: read_split(d, name, side) for name in names[1:]}  # small: held whole for BLEU
    first = next(iter_split(d, "train", chunk=1, side=side), None)
    # fail now, not at the first validation after hours of training
    for name, empty in (("train", first is None), ("valid", not texts["valid"][0])):
        if empty:
            paths = [mono_path(d, name)] if side is not None else local_paths(d, name)
            where = " ({})".format(" and ".join(map(str, paths))) if d.dir else ""
            raise NMTError(f"the {name} split is empty: no lines{where}")
    if tokenizer is None:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(cfg)
        log(f"trained {'joint' if tokenizer.joint else 'separate'} {cfg.tokenizer.model_type} "
            f"tokenizer in {time.perf_counter() - t0:.1f} s")
    tokenizer.save(out / "tokenizer")
    dtype = np.uint16 if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 65536 else np.int32
    counts = encode_train(cfg, tokenizer, out, dtype)
    if counts["kept"] == 0:
        raise NMTError(f"training corpus is empty after cleaning ({counts['empty']} empty pairs, "
                       f"{counts['unreadable']} with an unreadable line, {counts['max_len']} over data.max_len={d.max_len}, {counts['max_len_ratio']} "
                       f"over data.max_len_ratio={d.max_len_ratio} dropped)")
    splits = {name: load_split(out, name, np.dtype(dtype).name)
              for name in train_sets(cfg.tokenizer.sampled_segmentations)}
    truncated = {}
    for name in names[1:]:
        s, t = texts[name]
        src = encode_array(tokenizer.encode_src, s, dtype, f"encode {name} src")
        tgt = encode_array(tokenizer.encode_tgt, t, dtype, f"encode {name} tgt")
        src, tgt, truncated[name] = truncate_pairs(src, tgt, d.max_len)
        splits[name] = ParallelData(src, tgt, s, t)
    dropped = {k: counts[k] for k in ("empty", "unreadable", "max_len", "max_len_ratio")}
    save_splits(out, {k: v for k, v in splits.items() if k in names[1:]},
                build_meta(cfg, tokenizer, splits, counts["read"], dropped, truncated, CACHE_FORMAT))
