"""Adam with the paper's inverse-square-root warmup schedule."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from nmt.config import ModelConfig, TrainConfig

# Parameters of these modules are never decayed: pulling norm gains or embedding rows towards zero
# is not the regularisation weight decay is meant to be (as in BERT, Hugging Face and nanoGPT).
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.LayerNorm, nn.GroupNorm,
                                                 *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: matrices of linear layers decayed; biases, norm gains, embeddings not.

    A parameter shared by several modules (tied embeddings and output projection) counts as an
    embedding when any of its modules is one.
    """
    exempt = {id(p) for m in model.modules() if isinstance(m, NO_DECAY_MODULES)
              for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and id(p) not in exempt]
    no_decay = [p for p in params if p.ndim < 2 or id(p) in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (AdamW over ``decay_groups`` when weight decay is set); fused kernels on CUDA, foreach elsewhere.

    Not fused on the CPU, although the fused step is quicker there: it updates the weights without
    moving their version counters, which is how ``nmt.model.cpu_kernels.Linear`` notices that its
    packed copy is stale.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = any(p.is_cuda for p in params)
    kwargs = dict(lr=1.0, betas=cfg.adam_betas, eps=cfg.adam_eps)
    kwargs["fused" if on_cuda else "foreach"] = True
    # lr=1.0 here: the schedule's lambda returns the absolute learning rate.
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), **kwargs)
    # Without decay the split would change nothing; one group keeps older checkpoints loadable.
    return torch.optim.Adam(params, **kwargs)


def uses_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step runs fused kernels, which take the skip decision on the device (``found_inf``):
    what the parameter groups say, as a loaded state may differ from the constructor's defaults."""
    return all(g.get("fused") for g in optimizer.param_groups)


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total 2-norm of at most ``max_norm`` (0: leave them as they are);
    returns the norm before, on the device (non-finite when any gradient is, which decides skips).
    Without clipping only the norm is computed: clip_grad_norm_ with an infinite threshold would
    still multiply every gradient by one."""
    params = list(params)
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


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


def step_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One schedule step; the training loop moves the schedule on every attempted update, even one
    whose optimizer step was skipped (torch warns about that order)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()


def continue_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Put ``scheduler`` (and its optimizer's learning rates) where ``step`` updates would have left it."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        # torch warns when the schedule moves before any optimizer step: here that is the point
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()
