"""Position-wise feed-forward network: Linear(d, d_ff) -> activation -> Linear(d_ff, d)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nmt.errors import NMTError
from nmt.model.cpu_kernels import Linear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            choices = ", ".join(ACTIVATIONS)
            raise NMTError(f"unknown model.activation {activation!r}; choose one of: {choices}")
        self.activation = ACTIVATIONS[activation]
        self.linear1 = Linear(d_model, d_ff)
        self.linear2 = Linear(d_ff, d_model)
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> [..., d_model]."""
        return self.linear2(self.activation(self.linear1(x)))
