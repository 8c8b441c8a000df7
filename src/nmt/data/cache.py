"""The shared data cache: where it lives, the key of a prepared corpus, the lock that lets one
process build it while the others wait, and building into a temporary folder that is published
by a rename."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from nmt.config import Config, DataConfig, TokenizerConfig
from nmt.data.corpus import corpus_fingerprint, has_test, mono_side
from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer

CACHE_FORMAT = 3

Log = Callable[[str], None]


def cache_root(data_cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$XDG_CACHE_HOME/nmt/data`` (``~/.cache/nmt/data``)."""
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmt" / "data"


def cache_key(cfg: Config, tokenizer: Tokenizer | None = None) -> str:
    """Hash of everything the cached arrays depend on (the given ``tokenizer``'s models, if any)."""
    d, side = cfg.data, mono_side(cfg)
    splits = ["train", "valid"] + (["test"] if has_test(d, side) else [])
    inputs = {
        "format": CACHE_FORMAT,
        # the fingerprints of monolingual text name its side (the task's) and language
        "corpus": {s: corpus_fingerprint(d, s, side) for s in splits},
        "langs": [d.src_lang, d.tgt_lang],
        "cleaning": [d.max_len, d.max_len_ratio, d.max_line_bytes],
        "tokenizer": tokenizer_settings(cfg.tokenizer) if tokenizer is None else _models_hash(tokenizer),
    }
    if cfg.tokenizer.text == "pair":  # the tokenizer also read the other language's training text
        inputs["tokenizer_text"] = corpus_fingerprint(d, "train")
    if cfg.tokenizer.sampled_segmentations:
        inputs["sampling"] = [cfg.tokenizer.sampled_segmentations, cfg.tokenizer.sampling_alpha]
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_settings(tok: TokenizerConfig) -> dict:
    """The tokenizer settings a cache records; without sampled segmentations, the sampling fields
    are left out (and ``text`` when it is the default), so such a cache keeps the key and
    ``meta.json`` it had before they existed."""
    settings = dataclasses.asdict(tok)
    if not tok.sampled_segmentations:
        del settings["sampled_segmentations"], settings["sampling_alpha"]
    if tok.text == "task":
        del settings["text"]
    return settings


def _models_hash(tokenizer: Tokenizer) -> str:
    state = tokenizer.to_state()
    return hashlib.sha256(b"".join(name.encode() + state[name] for name in sorted(state))).hexdigest()


def is_complete(cache: Path) -> bool:
    return (cache / "meta.json").is_file()  # meta.json is written last


@contextlib.contextmanager
def locked(path: Path, log: Log) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: one process builds a cache, the others wait for it.
    The kernel drops the lock when its holder dies, so a killed build blocks nobody."""
    with open(path, "a+b") as f:
        if not _try_lock(f, path):
            log(f"waiting for another run preparing the same data ({path})")
            _lock(f, path, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_lock(f: IO[bytes], path: Path) -> bool:
    try:
        _lock(f, path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock(f: IO[bytes], path: Path, operation: int) -> None:
    try:
        fcntl.flock(f, operation)
    except BlockingIOError:
        raise
    except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: some network and FUSE file systems
        raise NMTError(f"cannot lock {path} ({e.strerror}): its file system does not support file "
                       "locks; set data.cache_dir to a folder on a local disk") from None


@contextlib.contextmanager
def building(root: Path, key: str) -> Iterator[Path]:
    """A fresh folder to build the cache ``key`` in: published under ``root / key`` when the block
    ends without an error, removed in every case, so an interrupted build is never used. The folder
    follows the umask (``mkdtemp`` would make it private), so a group can share the cache."""
    tmp = root / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, root / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep(root: Path, log: Log) -> None:
    """Remove the ``.tmp-<key>-*`` folders that builds killed by SIGKILL or a power loss left in
    ``root``: those whose key's lock is free (a live build holds its lock for as long as its folder
    exists)."""
    stale = [tmp for tmp in root.glob(".tmp-*-*") if _unlocked(root / f"{tmp.name.split('-')[1]}.lock")]
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    if stale:
        log(f"removed {len(stale)} folder(s) left in {root} by interrupted builds")


def _unlocked(path: Path) -> bool:
    """No process holds the lock ``path`` (or it does not exist); False where locks do not work."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return True
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def discard(cache: Path) -> None:
    """Remove a cache folder that must not be used (incomplete or corrupt), renaming it out of the
    way first so that no reader finds it half removed."""
    if cache.exists():
        aside = cache.with_name(f".tmp-{cache.name}-discarded-{os.getpid()}")
        os.rename(cache, aside)
        shutil.rmtree(aside, ignore_errors=True)


def _publish(tmp: Path, cache: Path) -> None:
    """Make the build durable, then visible: every file and folder is flushed to disk before the
    rename, so after a power loss or crash the cache is either absent or whole."""
    _sync_tree(tmp)
    if cache.exists() and not is_complete(cache):
        discard(cache)  # leftover without meta.json: not a usable cache
    try:
        os.rename(tmp, cache)
    except OSError:
        if not is_complete(cache):  # another process published the same key meanwhile
            raise
    _fsync(cache.parent)


def _sync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
