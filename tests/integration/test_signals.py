from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import ROOT, nmt

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it


def _args(run: Path, corpus: Path, steps: int) -> list[str]:
    return ["train", "-c", "configs/tiny.yaml", f"run_dir={run}", f"data.dir={corpus}", f"train.max_steps={steps}",
            "train.log_every=1", "train.valid_every=0", "train.save_every=5", "data.max_valid_sentences=4",
            "train.batch_tokens=256"]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _start_and_wait(args: list[str], run: Path, min_records: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "nmt.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= min_records:
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"training did not get going: {proc.communicate()[1][-2000:]}")


STEPS = 60


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_corpus) -> Path:
    """The uninterrupted run that a stopped and resumed one must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert nmt(*_args(run, small_corpus, STEPS)).returncode == 0
    return run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_exits_0_and_resume_is_exact(straight, tmp_path, small_corpus, sig):
    steps = STEPS
    run = tmp_path / "stopped"
    proc = _start_and_wait(_args(run, small_corpus, steps), run, min_records=3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < steps
    assert nmt(*_args(run, small_corpus, steps)).returncode == 0
    a, b = _losses(straight), _losses(run)
    for step in range(1, steps + 1):
        assert abs(a[step] - b[step]) < 1e-6, step
    wa = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_then_resume_from_last_saved_checkpoint(tmp_path, small_corpus):
    run = tmp_path / "killed"
    proc = _start_and_wait(_args(run, small_corpus, 200), run, min_records=12)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert saved >= 5
    result = nmt(*_args(run, small_corpus, saved + 3))
    assert result.returncode == 0, result.stderr
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step {saved}" in result.stdout


def test_second_train_on_the_same_run_dir_is_refused(tmp_path, small_corpus):
    run = tmp_path / "busy"
    proc = _start_and_wait(_args(run, small_corpus, 400), run, min_records=1)
    try:
        result = nmt(*_args(run, small_corpus, 400))
        assert result.returncode == 2 and "in use by another nmt train" in result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
