"""Validator: best.pt on improvement of train.best_metric, early stopping after train.patience."""

from __future__ import annotations

import pytest
import torch

from nmt.config import Config, TrainConfig, load_config
from nmt.distributed import DistInfo
from nmt.resume import TrainState
from nmt.tasks import VALIDATION
from nmt.validate import Validator


class Recorder:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def _validator(monkeypatch, scores, **train):
    results = iter(scores)
    monkeypatch.setitem(VALIDATION, "translation", lambda *a: {
        "valid_loss": (s := next(results))[1], "valid_ppl": 1.0, "valid_bleu": s[0], "valid_chrf": 0.0})
    saved, messages = [], []
    cfg = Config(train=TrainConfig(**train))
    v = Validator(cfg, None, torch.device("cpu"), DistInfo(), Recorder(), messages.append,
                  save_best=lambda: saved.append(True))
    return v, saved, messages


@pytest.mark.parametrize("metric, scores", [("bleu", [(10, 5), (12, 9), (11, 1), (11, 1)]),
                                            ("loss", [(0, 5), (0, 4), (9, 4.5), (9, 4.1)])])
def test_best_is_saved_on_improvement_and_patience_stops(monkeypatch, metric, scores):
    v, saved, messages = _validator(monkeypatch, scores, best_metric=metric, patience=2)
    state = TrainState()
    for step in range(1, 4):
        state.step = step
        v(torch.nn.Linear(1, 1), state)
        assert not state.stopped_early
    assert len(saved) == 2 and state.bad_validations == 1
    v(torch.nn.Linear(1, 1), state)
    assert state.stopped_early and len(saved) == 2
    assert any("early stopping: no improvement in 2 validations" in m for m in messages)
    assert [r["step"] for r in v.metrics.records] == [1, 2, 3, 3]


def test_no_patience_never_stops(monkeypatch):
    v, saved, _ = _validator(monkeypatch, [(5, 1)] + [(1, 9)] * 5, patience=0)
    state = TrainState()
    for _ in range(6):
        v(torch.nn.Linear(1, 1), state)
    assert not state.stopped_early and len(saved) == 1 and state.bad_validations == 5


def test_due_every_valid_every_steps():
    v = Validator(Config(train=TrainConfig(valid_every=3)), None, torch.device("cpu"), DistInfo(), Recorder(),
                  print, save_best=lambda: None)
    assert [s for s in range(1, 10) if v.due(s)] == [3, 6, 9]
    v0 = Validator(Config(train=TrainConfig(valid_every=0)), None, torch.device("cpu"), DistInfo(), Recorder(),
                   print, save_best=lambda: None)
    assert not any(v0.due(s) for s in range(1, 10))


def test_a_masked_lm_logs_its_accuracy_and_keeps_the_best_loss(monkeypatch):
    losses = iter([5.0, 4.0, 4.5])
    monkeypatch.setitem(VALIDATION, "mlm", lambda *a: {"valid_loss": next(losses), "valid_ppl": 1.0,
                                                       "valid_accuracy": 12.5})
    saved, messages = [], []
    # best_metric=bleu (the default) means the loss for a task without BLEU
    v = Validator(Config(task="mlm"), None, torch.device("cpu"), DistInfo(), Recorder(), messages.append,
                  save_best=lambda: saved.append(True))
    state = TrainState()
    for _ in range(3):
        v(torch.nn.Linear(1, 1), state)
    assert len(saved) == 2 and state.best == -4.0
    assert messages[0].endswith("| loss 5.000 | ppl 1.00 | accuracy 12.50")


@pytest.mark.parametrize("metric, scores, top", [
    ("bleu", [(10, 0), (12, 0), (11, 0), (12, 0), (9, 0)], [[12, 2], [12, 4], [11, 3]]),
    ("loss", [(0, 5), (0, 4), (0, 4.5), (0, 4), (0, 6)], [[-4, 2], [-4, 4], [-4.5, 3]])])
def test_keep_best_ranks_validations_ties_to_the_earlier_step(monkeypatch, metric, scores, top):
    v, _, _ = _validator(monkeypatch, scores, best_metric=metric, keep_best=3)
    state = TrainState()
    for step in range(1, 6):
        state.step = step
        v(torch.nn.Linear(1, 1), state)
    assert state.top == top


def test_without_keep_best_no_ranking_is_kept(monkeypatch):
    v, _, _ = _validator(monkeypatch, [(10, 1)])
    state = TrainState()
    v(torch.nn.Linear(1, 1), state)
    assert state.top == []


def test_lm_best_is_chosen_by_loss_and_logged_without_bleu(monkeypatch):
    losses = iter([5.0, 4.0, 4.5])
    monkeypatch.setitem(VALIDATION, "lm", lambda *a: {"valid_loss": (x := next(losses)), "valid_ppl": 2.0 ** x})
    saved, messages = [], []
    cfg = load_config(None, ["task=lm", "model.arch=decoder_only", "data.lang=de"])
    assert cfg.train.best_metric == "bleu"  # the default: an lm run uses loss all the same
    v = Validator(cfg, None, torch.device("cpu"), DistInfo(), Recorder(), messages.append,
                  save_best=lambda: saved.append(True))
    state = TrainState()
    for step in (1, 2, 3):
        state.step = step
        v(torch.nn.Linear(1, 1), state)
    assert len(saved) == 2 and state.best == -4.0
    assert messages[0] == "valid step       1 | loss 5.000 | ppl 32.00"
