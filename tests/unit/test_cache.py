"""The shared cache: keys, locks, interrupted and concurrent builds."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tests.unit.prepare_helpers import Log, make_cfg, make_corpus, write_split

from nmt.data import encode as encode_mod
from nmt.data import prepare as prepare_mod
from nmt.data.cache import cache_key
from nmt.data.prepare import load_prepared, prepare_data
from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer


def forbid_corpus_work(monkeypatch) -> None:
    """Make every way of reading the corpus or training a tokenizer fail: a cache hit does none."""
    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not read the corpus or train a tokenizer")

    monkeypatch.setattr(Tokenizer, "train", fail)
    monkeypatch.setattr(Tokenizer, "train_streaming", fail)
    monkeypatch.setattr(prepare_mod, "iter_split", fail)
    monkeypatch.setattr(prepare_mod, "read_split", fail)


def test_cache_hit_skips_reading_and_tokenization(tmp_path, corpus_dir, monkeypatch):
    cfg = make_cfg(tmp_path, corpus_dir)
    first = prepare_data(cfg, log=Log())

    forbid_corpus_work(monkeypatch)
    log = Log()
    second = prepare_data(cfg, log=log)
    assert log.has("using cached data")
    assert np.array_equal(second.train.tgt.data, first.train.tgt.data)
    assert second.test.tgt_text == first.test.tgt_text
    assert second.tokenizer.to_state() == first.tokenizer.to_state()


def test_cache_is_keyed_by_settings_and_files(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    prepare_data(cfg, log=Log())
    bigger = make_cfg(tmp_path, corpus_dir, vocab_size=70)
    assert cache_key(bigger) != cache_key(cfg)
    log = Log()
    assert prepare_data(bigger, log=log).tokenizer.src_vocab_size == 70
    assert not log.has("using cached data")
    write_split(corpus_dir, "val", *make_corpus(21, 5))  # edited corpus file: new key
    log = Log()
    assert len(prepare_data(cfg, log=log).valid) == 21 and not log.has("using cached data")
    assert len([p for p in Path(cfg.data.cache_dir).iterdir() if p.is_dir()]) == 3


def test_interrupted_cache_is_not_used(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    root = Path(cfg.data.cache_dir)
    key = cache_key(cfg)
    (root / f".tmp-{key}-dead").mkdir(parents=True)  # left by a killed run
    (root / f".tmp-{key}-dead" / "train.src.bin").write_bytes(b"garbage")
    (root / key).mkdir()  # a cache folder without meta.json is incomplete
    (root / key / "train.src.bin").write_bytes(b"garbage")
    log = Log()
    data = prepare_data(cfg, log=log)
    assert not log.has("using cached data") and len(data.train) == 200
    assert (root / key / "meta.json").is_file()


def test_failed_build_leaves_no_cache(tmp_path, corpus_dir, monkeypatch):
    cfg = make_cfg(tmp_path, corpus_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_mod, "length_filter", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, log=Log())
    assert [p for p in Path(cfg.data.cache_dir).iterdir() if p.suffix != ".lock"] == []


def test_cache_shared_by_two_run_dirs(tmp_path, corpus_dir, monkeypatch):
    cfg = make_cfg(tmp_path, corpus_dir)
    first = prepare_data(cfg, log=Log())

    forbid_corpus_work(monkeypatch)
    other = make_cfg(tmp_path / "elsewhere", corpus_dir)
    other.data.cache_dir = cfg.data.cache_dir
    log = Log()
    second = prepare_data(other, log=log)
    assert log.has(f"using cached data {Path(cfg.data.cache_dir) / cache_key(cfg)}")
    assert np.array_equal(second.train.src.data, first.train.src.data)
    assert Tokenizer.load(Path(other.run_dir) / "tokenizer").to_state() == first.tokenizer.to_state()


def test_concurrent_prepares_build_once(tmp_path, corpus_dir, monkeypatch):
    builds = []
    write_splits = prepare_mod._write_splits

    def slow_build(*args, **kwargs):
        builds.append(1)
        time.sleep(0.5)  # the other thread arrives while this one builds
        write_splits(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_write_splits", slow_build)
    cfgs = [make_cfg(tmp_path / name, corpus_dir) for name in ("a", "b")]
    cfgs[1].data.cache_dir = cfgs[0].data.cache_dir
    logs = [Log(), Log()]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: prepare_data(cfgs[i], log=logs[i]), range(2)))
    assert len(builds) == 1
    assert any(log.has("waiting for another run preparing the same data") for log in logs)
    assert np.array_equal(results[0].train.tgt.data, results[1].train.tgt.data)
    assert [p.name for p in Path(cfgs[0].data.cache_dir).iterdir() if p.is_dir()] == [cache_key(cfgs[0])]


@pytest.mark.parametrize("damage", ["truncate train.src.bin", "remove valid.tgt.offsets.npy",
                                    "truncate meta.json", "garble tokenizer/joint.model"])
def test_a_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, corpus_dir, damage):
    cfg = make_cfg(tmp_path, corpus_dir)
    first = prepare_data(cfg, log=Log())
    cache = Path(first.cache_dir)
    want = np.array(first.train.src.data)
    action, name = damage.split()
    if action == "truncate":
        with open(cache / name, "r+b") as f:
            f.truncate(f.seek(0, 2) // 4 * 2)  # whole tokens: only the size check can tell
    elif action == "remove":
        (cache / name).unlink()
    else:
        (cache / name).write_bytes(b"not a model")
    log = Log()
    second = prepare_data(cfg, log=log)
    assert log.has(f"warning: cached data in {cache} is corrupt") and log.has(f"cached data in {cache}")
    assert not log.has("using cached data")
    assert np.array_equal(second.train.src.data, want) and len(second.valid) == 20
    assert [p.name for p in cache.parent.iterdir() if p.suffix != ".lock"] == [cache.name]


def test_load_prepared_refuses_a_corrupt_cache(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    cache = Path(prepare_data(cfg, log=Log()).cache_dir)
    with open(cache / "train.tgt.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(NMTError, match="is corrupt .*train.tgt.bin: 10 bytes"):
        load_prepared(cfg)


def test_the_build_is_on_disk_before_it_is_published(tmp_path, corpus_dir, monkeypatch):
    synced: list[str] = []
    rename = os.rename

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    def published(src, dst):
        if Path(dst).name == cache_key(cfg):
            tmp = Path(src)
            assert {str(p) for p in tmp.rglob("*")} | {str(tmp)} <= set(synced)
            synced.clear()
        rename(src, dst)

    cfg = make_cfg(tmp_path, corpus_dir)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", published)
    prepare_data(cfg, log=Log())
    assert synced == [str(Path(cfg.data.cache_dir))]  # and the folder holding the new name


def test_folders_left_by_killed_builds_are_swept_unless_a_build_holds_their_lock(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    root = Path(cfg.data.cache_dir)
    root.mkdir()
    key = cache_key(cfg)
    dead = [root / f".tmp-{key}-41-dead", root / ".tmp-0123456789abcdef-42-dead"]
    (root / "0123456789abcdef.lock").touch()  # its build was killed: the lock is free
    live = root / ".tmp-fedcba9876543210-43-live"
    for folder in [*dead, live]:
        folder.mkdir()
        (folder / "train.src.bin").write_bytes(b"\0" * 1000)
    log = Log()
    with open(root / "fedcba9876543210.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build of another corpus, running
        prepare_data(cfg, log=log)
    assert not any(folder.exists() for folder in dead) and live.is_dir()
    assert log.has(f"removed 2 folder(s) left in {root} by interrupted builds")


def test_the_cache_follows_the_umask(tmp_path, corpus_dir):
    previous = os.umask(0o002)  # a group-shared cache
    try:
        cache = Path(prepare_data(make_cfg(tmp_path, corpus_dir), log=Log()).cache_dir)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o775
    for path in cache.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o775 if path.is_dir() else 0o664), path


def test_a_file_system_without_locks_is_one_line_naming_cache_dir(tmp_path, corpus_dir, monkeypatch):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cfg = make_cfg(tmp_path, corpus_dir)
    with pytest.raises(NMTError) as raised:
        prepare_data(cfg, log=Log())
    assert str(raised.value) == (f"cannot lock {Path(cfg.data.cache_dir) / cache_key(cfg)}.lock (No locks "
                                 "available): its file system does not support file locks; set "
                                 "data.cache_dir to a folder on a local disk")


def test_task_and_language_key_the_cache(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    translation = cache_key(cfg)
    cfg.task, cfg.model.arch, cfg.data.lang = "lm", "decoder_only", "de"
    lm = cache_key(cfg)
    cfg.data.lang = "en"
    lm_en = cache_key(cfg)
    cfg.task, cfg.model.arch = "mlm", "encoder_only"
    mlm = cache_key(cfg)
    cfg.tokenizer.text = "pair"
    assert len({translation, lm, lm_en, mlm, cache_key(cfg)}) == 5
    cfg.tokenizer.text = "task"
    cfg.task, cfg.data.lang = "lm", "de"
    assert prepare_data(cfg, log=Log()).train.src.lengths().max() == 0
    cfg.task, cfg.data.lang = "translation", None
    log = Log()
    assert prepare_data(cfg, log=log).train.src.lengths().min() > 0 and not log.has("using cached data")


def test_sampled_segmentations_key_the_cache_and_off_keeps_the_old_key(tmp_path, corpus_dir):
    off = make_cfg(tmp_path, corpus_dir)
    assert cache_key(off) == "8fbbe8ffe8512394"  # the key before sampled segmentations existed
    assert cache_key(make_cfg(tmp_path, corpus_dir, sampling_alpha=0.3)) == cache_key(off)  # unused when off
    keys = {cache_key(make_cfg(tmp_path, corpus_dir, sampled_segmentations=k, sampling_alpha=a))
            for k, a in ((0, 0.1), (1, 0.1), (2, 0.1), (2, 0.2))}
    assert len(keys) == 4
    data = prepare_data(off, log=Log())
    trained = make_cfg(tmp_path, corpus_dir, sampled_segmentations=2)  # a given tokenizer keys by its models
    other_alpha = make_cfg(tmp_path, corpus_dir, sampled_segmentations=2, sampling_alpha=0.2)
    assert len({cache_key(c, data.tokenizer) for c in (off, trained, other_alpha)}) == 3
    meta = json.loads((Path(data.cache_dir) / "meta.json").read_text())
    assert "sampled_segmentations" not in meta["tokenizer"]


def test_a_cache_with_sampled_segmentations_is_the_same_bytes_on_every_build(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setattr(encode_mod, "CHUNK", 30)  # several chunks, encoded by a pool of processes
    folders = [Path(prepare_data(make_cfg(tmp_path / name, corpus_dir, sampled_segmentations=2),
                                 log=Log()).cache_dir) for name in ("a", "b")]
    files = [{p.relative_to(f): p.read_bytes() for p in sorted(f.rglob("*")) if p.is_file()} for f in folders]
    assert files[0] == files[1]
    assert {"train.sample1.tgt.bin", "train.sample1.tgt.offsets.npy"} <= {str(p) for p in files[0]}
