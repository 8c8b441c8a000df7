"""Validation during training: scores on rank 0, best.pt on improvement, and early stopping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nmt import distributed as D
from nmt.config import Config
from nmt.tasks import VALIDATION

LOGGED = (("valid_loss", "loss", ".3f"), ("valid_ppl", "ppl", ".2f"), ("valid_bleu", "BLEU", ".2f"),
          ("valid_chrf", "chrF", ".2f"), ("valid_accuracy", "accuracy", ".2f"))
"""The validation scores in the log line: (key, label, format), those the task has."""


def best_metric(cfg: Config) -> str:
    """``train.best_metric``; loss for a task without BLEU (nothing is decoded on its validation)."""
    return cfg.train.best_metric if cfg.task == "translation" else "loss"


class Validator:
    """Scores the model on the validation split (rank 0), calls ``save_best`` when ``train.best_metric``
    improves, and decides early stopping after ``train.patience`` validations without improvement.

    ``state`` is the run's TrainState: ``best``, ``bad_validations`` and ``stopped_early`` are kept
    there, so that they travel in the checkpoint.
    """

    def __init__(self, cfg: Config, data: Any, device: torch.device, dist: D.DistInfo, metrics: Any,
                 log: Callable[[str], None], save_best: Callable[[], None]):
        self.cfg, self.data, self.device, self.dist = cfg, data, device, dist
        self.metrics, self.log, self.save_best = metrics, log, save_best

    def due(self, step: int) -> bool:
        every = self.cfg.train.valid_every
        return bool(every) and step % every == 0

    def __call__(self, model: torch.nn.Module, state: Any) -> dict[str, float] | None:
        """Validate at ``state.step``; every rank learns whether to stop early."""
        stop = False
        result = None
        if self.dist.is_main:
            result = VALIDATION[self.cfg.task](model, self.data, self.cfg, self.device)
            result["step"] = state.step
            self.metrics.write(result)
            self.log(f"valid step {state.step:>7} | " + " | ".join(
                f"{label} {result[key]:{form}}" for key, label, form in LOGGED if key in result))
            stop = self._update_best(result, state)
        state.stopped_early = D.any_rank([stop], self.dist, self.device)[0]
        return result

    def _update_best(self, result: dict[str, float], state: Any) -> bool:
        """Save best.pt on improvement; True when patience has run out."""
        value = result["valid_bleu"] if best_metric(self.cfg) == "bleu" else -result["valid_loss"]
        keep = self.cfg.train.keep_best
        if keep:  # ties keep the earlier step
            state.top = sorted([*state.top, [value, state.step]], key=lambda t: (-t[0], t[1]))[:keep]
        if state.best is None or value > state.best:
            state.best = value
            state.bad_validations = 0
            self.save_best()
            return False
        state.bad_validations += 1
        patience = self.cfg.train.patience
        if patience and state.bad_validations >= patience:
            self.log(f"early stopping: no improvement in {patience} validations")
            return True
        return False
