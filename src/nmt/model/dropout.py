"""Inverted dropout whose CPU masks take a quarter of the random draws of ``F.dropout``.

On the CPU, torch draws one random number per element, serially; for the small model that was 8%
of a training step. Here each 64-bit draw gives four 16-bit uniforms, so ``p`` is rounded to a
multiple of 1/65536 (0.1 -> 0.100006) and kept elements are scaled by the inverse of the exact
keep rate, which leaves the expectation unchanged. Other devices use torch's fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # values of one 16-bit lane


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Bool mask of ``shape`` with True (keep) at rate 1 - round(p * 65536) / 65536, and that rate."""
    dropped = round(p * _LEVELS)
    numel = shape.numel()
    # full-range int64 draws: every bit uniform, so each int16 lane is uniform on [-32768, 32767]
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:numel].view(shape)
    return lanes >= dropped - _LEVELS // 2, 1.0 - dropped / _LEVELS


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero elements with probability ~p and scale the rest by 1 / keep rate; identity when not training."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep, rate = keep_mask(x.shape, p, x.device)
    # where() keeps only the bool mask for backward (1 byte per element, as F.dropout does)
    return torch.where(keep, x * (1.0 / rate), 0.0)


class Dropout(nn.Module):
    """``nn.Dropout`` with the cheaper CPU mask of ``dropout``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
