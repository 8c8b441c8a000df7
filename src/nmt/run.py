"""What a training run holds besides its loop: the lock on its run_dir, the stop signals it
answers, its metrics log (``metrics.jsonl`` and, with ``train.tensorboard``, TensorBoard) and the
sums behind each log line."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from nmt import distributed as D
from nmt.errors import NMTError


def check_writable(run_dir: Path, is_main: bool) -> None:
    """Create ``run_dir``; on rank 0 also prove a file can be written there (one-line NMTError if not)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_main:
            probe = run_dir / ".write_test"
            probe.touch()
            probe.unlink()
    except OSError as e:
        raise NMTError(f"run_dir {run_dir} is not writable: {e.strerror}") from None


class RunLock:
    """An exclusive ``flock`` on ``run_dir/train.lock``; the kernel drops it if the process dies."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "train.lock"
        self.file = None

    def __enter__(self) -> RunLock:
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise NMTError(f"{self.path.parent} is in use by another nmt train (lock {self.path})") from None
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` (rank 0 only: others pass path None).

    With ``tensorboard_dir`` every number of a record (except ``step``) is also written there as a
    TensorBoard scalar at that step: ``train/loss``, ``train/lr``, ..., ``valid/loss``, ``valid/bleu``.
    """

    def __init__(self, path: Path | None, tensorboard_dir: Path | None = None):
        self.path = path
        self.tensorboard = (tensorboard_writer(tensorboard_dir)
                            if path is not None and tensorboard_dir is not None else None)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(scalar_tag(key), value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def scalar_tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: ``valid_bleu`` -> ``valid/bleu``, ``loss`` -> ``train/loss``."""
    return f"valid/{key[len('valid_'):]}" if key.startswith("valid_") else f"train/{key}"


def tensorboard_writer(log_dir: Path):
    """A ``SummaryWriter`` on ``log_dir``; a one-line NMTError when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise NMTError("train.tensorboard=true needs the tensorboard package: "
                       "pip install 'nmt[tensorboard]'") from None
    return SummaryWriter(str(log_dir))


class LogWindow:
    """Sums over the updates between two log lines. The tensor sums stay on the device: they are
    read (and summed over ranks) only in ``summary``, at a log step."""

    def __init__(self, device: torch.device):
        zero = torch.zeros((), device=device)
        self.device = device
        self.loss, self.nll, self.grad_norm = zero.clone(), zero.clone(), zero.clone()
        self.good = torch.zeros((), dtype=torch.int64, device=device)  # updates applied
        self.tokens = self.real = self.padded = self.steps = 0
        self.start = time.perf_counter()

    def add_batch(self, loss: torch.Tensor, nll: torch.Tensor, tokens: int, real: int, padded: int) -> None:
        """One micro-batch: its summed loss and NLL, target tokens, and real and padded tokens of both sides."""
        self.loss += loss.detach()
        self.nll += nll
        self.tokens += tokens
        self.real += real
        self.padded += padded

    def add_update(self, grad_norm: torch.Tensor, bad: torch.Tensor) -> None:
        """One optimizer update; ``bad``: it was skipped (its norm is not averaged)."""
        self.grad_norm += torch.where(bad, 0.0, grad_norm.detach().float())
        self.good += ~bad

    def summary(self, dist: D.DistInfo) -> dict[str, float] | None:
        """Per-token loss, NLL and perplexity over all ranks, mean gradient norm, target tokens per
        second, padding efficiency; None when no batch was counted (every update ran out of memory)."""
        totals = torch.stack([self.loss, self.nll, torch.tensor(float(self.tokens), device=self.device)])
        loss, nll, tokens = D.all_reduce_sum_(totals, dist).tolist()
        good = int(self.good)
        elapsed = time.perf_counter() - self.start
        if tokens == 0:
            return None
        return {"loss": loss / tokens, "nll_loss": nll / tokens, "ppl": math.exp(min(nll / tokens, 50)),
                "grad_norm": float(self.grad_norm) / max(good, 1), "tokens_per_s": tokens / elapsed,
                "padding_efficiency": self.real / max(self.padded, 1)}
