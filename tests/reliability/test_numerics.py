"""Non-finite gradients: skipped and counted while training goes on; repeated ones stop with a save."""

from __future__ import annotations

import json

import pytest
import torch

import nmt.loss
from nmt.checkpoint import load_checkpoint
from tests.reliability.conftest import one_line_error, train_args

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it


def test_fp16_overflow_skips_and_counts_steps_and_training_continues(cli, tmp_path, small_corpus, monkeypatch):
    # A real fp16 overflow on the CPU: the gradient scaler starts far too high, so the first
    # scaled fp16 gradients overflow to inf until it has backed off.
    real_scaler = torch.amp.GradScaler

    class HighScaler(real_scaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "init_scale": 2.0 ** 24})

    monkeypatch.setattr(torch.amp, "GradScaler", HighScaler)
    run_dir = tmp_path / "run"
    steps = 8
    result = cli(*train_args(run_dir, small_corpus, "train.precision=fp16", f"train.max_steps={steps}",
                             "train.batch_tokens=128"))
    assert result.rc == 0, result.err
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    skipped = ckpt["train_state"]["skipped_steps"]
    assert 1 <= skipped < steps and ckpt["step"] == steps
    assert ckpt["scaler"]["scale"] < 2.0 ** 24  # the scaler backed off
    warnings = [ln for ln in result.out.splitlines() if "non-finite gradients" in ln and "update skipped" in ln]
    assert len(warnings) == skipped
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert logged[-1]["skipped_steps"] == skipped
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_repeated_nan_stops_with_a_saved_checkpoint_and_advice(cli, tmp_path, small_corpus, monkeypatch):
    real_loss = nmt.loss.label_smoothed_nll

    def nan_loss(*args):
        loss, nll = real_loss(*args)
        return loss * float("nan"), nll

    monkeypatch.setattr(nmt.loss, "label_smoothed_nll", nan_loss)
    run_dir = tmp_path / "run"
    line = one_line_error(cli(*train_args(run_dir, small_corpus, "train.max_steps=50", "train.max_bad_steps=3")))
    assert "3 updates in a row had non-finite gradients" in line
    assert "train.precision=bf16" in line and "lower train.lr" in line
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    # skipped updates are no steps: neither the step count nor the schedule moved
    assert ckpt["step"] == 0 and ckpt["train_state"]["skipped_steps"] == 3 and ckpt["scheduler"]["last_epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
