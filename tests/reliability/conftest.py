"""Helpers for the fault and bad-input suite: run `nmt` as a user would and check its errors.

Most cases call ``nmt.cli.run`` in-process (a subprocess costs seconds of torch import); the ones
that need a real process (offline Hub, peak memory of a translate run) use ``nmt_process``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nmt.cli import run

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    rc: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*args, stdin=b"...")`` runs ``nmt ARGS`` in this process and returns a Result."""
    monkeypatch.delenv("NMT_DEBUG", raising=False)

    def call(*args: str, stdin: bytes | None = None) -> Result:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        capsys.readouterr()
        rc = run([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)

    return call


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every reliability test runs torch on one thread (see tests/conftest.py)."""
    yield


def one_line_error(result: Result) -> str:
    """The single ``error: ...`` line of a failed command (exit 2, no traceback)."""
    assert result.rc == 2, (result.rc, result.err[-3000:])
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err[-3000:]
    assert "Traceback" not in result.err
    return lines[0]


def nmt_process(*args: str, input: bytes | None = None, env: dict | None = None, timeout: float = 240,
                python: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m nmt.cli ARGS`` (or ``python`` + ARGS) in a fresh process, bytes in and out."""
    full_env = {k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    command = [sys.executable, *(python or ["-m", "nmt.cli"]), *args]
    return subprocess.run(command, input=input, capture_output=True, timeout=timeout, cwd=ROOT, env=full_env)


def train_args(run_dir: Path, corpus: Path | str, *extra: str) -> list[str]:
    """`nmt train` on the tiny config, sized to take seconds on a shared 2-core CPU."""
    return ["train", "-c", "configs/tiny.yaml", f"run_dir={run_dir}", f"data.dir={corpus}",
            "train.max_steps=3", "train.valid_every=0", "train.save_every=100", "train.log_every=1",
            "train.batch_tokens=256", "train.threads=1", "data.max_valid_sentences=1", *extra]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, small_corpus) -> Path:
    """last.pt of a tiny model trained for 3 steps through `nmt train` (vocab 256, d_model 64)."""
    run_dir = tmp_path_factory.mktemp("reliability") / "tiny"
    threads = torch.get_num_threads()
    try:
        assert run(train_args(run_dir, small_corpus)) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir / "checkpoints" / "last.pt"
