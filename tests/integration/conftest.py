"""Runs the real `nmt` command line in subprocesses, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def nmt(*args: str, input: str | None = None, timeout: float = 300, env: dict | None = None):
    """Run ``python -m nmt.cli ARGS`` and return the CompletedProcess (text mode)."""
    full_env = {k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "nmt.cli", *args], input=input, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=full_env)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_corpus) -> Path:
    """A tiny model trained for a few steps through `nmt train` (shared by the CLI tests)."""
    run = tmp_path_factory.mktemp("run") / "tiny"
    result = nmt("train", "-c", "configs/tiny.yaml", f"run_dir={run}", f"data.dir={small_corpus}",
                 "train.max_steps=30", "train.valid_every=15", "train.save_every=10", "train.keep_last=3",
                 "data.max_valid_sentences=16")
    assert result.returncode == 0, result.stderr
    return run
