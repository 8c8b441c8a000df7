"""Adam with the paper's inverse-square-root warmup schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from nmt.config import ModelConfig, TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (AdamW when weight decay is set); fused kernels on CUDA, foreach elsewhere.

    Not fused on the CPU: there the fused step (8.9 against 29 ms on the small model) updates the
    weights without moving their version counters, which is how ``nmt.model.linear.Linear``
    notices that its packed copy is stale.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = any(p.is_cuda for p in params)
    kwargs = dict(lr=1.0, betas=cfg.adam_betas, eps=cfg.adam_eps)
    kwargs["fused" if on_cuda else "foreach"] = True
    # lr=1.0 here: the schedule's lambda returns the absolute learning rate.
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(params, weight_decay=cfg.weight_decay, **kwargs)
    return torch.optim.Adam(params, **kwargs)


def peak_lr(train: TrainConfig, model: ModelConfig) -> float:
    """``train.lr`` when set, else the paper's d_model^-0.5 * warmup^-0.5."""
    if train.lr > 0:
        return train.lr
    return model.d_model**-0.5 * train.warmup_steps**-0.5


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then decay with 1/sqrt(step).

    ``step`` counts from 0 (the first update uses step + 1, so it is never zero).
    """
    s = step + 1
    return peak * min(s / warmup, math.sqrt(warmup / s))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, model: ModelConfig):
    peak = peak_lr(train, model)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: inverse_sqrt_lr(step, peak, train.warmup_steps)
    )
