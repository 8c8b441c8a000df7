from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from nmt.config import load_config
from nmt.errors import NMTError
from nmt.run import MetricsLog, RunLock, StopSignal, scalar_tag
from nmt.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(run_dir: Path, corpus: Path, *overrides: str):
    return load_config(CONFIGS / "tiny.yaml", [f"run_dir={run_dir}", f"data.dir={corpus}", "train.tensorboard=true",
                                               "data.max_valid_sentences=4", "train.keep_last=0", *overrides])


def test_scalar_tags():
    assert scalar_tag("loss") == "train/loss"
    assert scalar_tag("tokens_per_s") == "train/tokens_per_s"
    assert scalar_tag("valid_bleu") == "valid/bleu"


@pytest.mark.slow
def test_training_writes_the_metrics_as_tensorboard_scalars(tmp_path, small_corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(_cfg(run, small_corpus, "train.max_steps=4", "train.log_every=2", "train.valid_every=2"),
          log=lambda _m: None)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/loss",
            "valid/bleu"} <= tags
    for tag in ("train/loss", "valid/bleu"):
        assert [e.step for e in events.Scalars(tag)] == [2, 4]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)


@pytest.mark.slow
def test_missing_tensorboard_fails_at_once_with_one_line(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    run = tmp_path / "run"
    with pytest.raises(NMTError) as info:
        train(_cfg(run, small_corpus, "train.max_steps=2"), log=lambda _m: None)
    assert str(info.value) == ("train.tensorboard=true needs the tensorboard package: "
                               "pip install 'nmt[tensorboard]'")
    assert not (run / "data").exists(), "the error should come before the data is prepared"


def test_only_the_main_rank_writes(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(None, tmp_path / "tb")  # what the other ranks get
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "tb").exists()


def test_second_trainer_on_the_same_run_dir_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(NMTError, match="in use"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released again
        pass


def test_a_stop_signal_sets_the_flag_and_the_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_log_window_averages_per_token_and_over_applied_updates():
    import torch

    from nmt.distributed import DistInfo
    from nmt.run import LogWindow

    w = LogWindow(torch.device("cpu"))
    w.add_batch(torch.tensor(6.0), torch.tensor(4.0), tokens=2, real=5, padded=10)
    w.add_batch(torch.tensor(3.0), torch.tensor(2.0), tokens=1, real=5, padded=10)
    w.add_update(torch.tensor(2.0), torch.tensor(False))
    w.add_update(torch.tensor(float("inf")), torch.tensor(True))  # skipped: not in the mean norm
    s = w.summary(DistInfo())
    assert (s["loss"], s["nll_loss"], s["grad_norm"], s["padding_efficiency"]) == (3.0, 2.0, 2.0, 0.5)
    assert LogWindow(torch.device("cpu")).summary(DistInfo()) is None
