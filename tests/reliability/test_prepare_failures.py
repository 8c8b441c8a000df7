"""A preparation that fails (a killed worker, a crash, a cache cut short) leaves nothing that a later
run trusts, holds no lock, and a rerun builds the cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.conftest import nmt_process
from tests.unit.prepare_helpers import write_corpus

# Runs `nmt prepare ARGS` and SIGKILLs a worker process at work, as the out-of-memory killer would.
# argv[1] "encode": the corpus counts as large (chunks of 30 pairs to a pool of encoding processes),
# and a worker is killed once the first chunk is written. "tokenizer": SentencePiece trains in a
# process of its own, killed once it exists.
KILL_A_WORKER = """
import glob, multiprocessing, os, signal, sys, threading, time
from nmt.cli import run
from nmt.data import encode, tokenizer_training

def at_work(stage, cache, corpus):
    if stage == "encode":
        return any(os.path.getsize(p) for p in glob.glob(f"{cache}/.tmp-*/train.src.bin"))
    # as soon as it exists: a small corpus can be read and trained on between two polls
    return bool(multiprocessing.active_children())

def kill_a_worker(stage, cache, corpus):
    while not at_work(stage, cache, corpus):
        time.sleep(0.002)
    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

if __name__ == "__main__":
    stage, cache, corpus, *args = sys.argv[1:]
    if stage == "encode":
        encode.CHUNK = 30
    else:
        tokenizer_training.APART_MIN = 50
    threading.Thread(target=kill_a_worker, args=(stage, cache, corpus), daemon=True).start()
    sys.exit(run(args))
"""


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus", 3000)


def prepare_args(tmp_path: Path, corpus: Path) -> list[str]:
    return ["prepare", "-c", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", f"data.dir={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}", "tokenizer.vocab_size=60", "data.max_len_ratio=5"]


@pytest.mark.parametrize("stage", ["encode", "tokenizer"])
def test_a_killed_worker_stops_prepare_and_a_rerun_builds_the_cache(tmp_path, corpus, stage):
    start = time.monotonic()
    killed = nmt_process(stage, str(tmp_path / "cache"), str(corpus), *prepare_args(tmp_path, corpus), python=["-c", KILL_A_WORKER], timeout=60)
    err = killed.stderr.decode()
    assert killed.returncode == 2, err
    assert time.monotonic() - start < 60
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "worker process died" in lines[0] and "memory" in lines[0], err
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if p.suffix != ".lock"] == []  # no partial cache
    rerun = nmt_process(*prepare_args(tmp_path, corpus), timeout=120)  # the lock was released
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert len(list(cache.glob("*/meta.json"))) == 1
