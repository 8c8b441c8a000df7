"""Encoder and decoder layers: attention / feed-forward sublayers with residuals and LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.model.attention import CrossAttention, SelfAttention
from nmt.model.cpu_kernels import Dropout
from nmt.model.feedforward import FeedForward
from nmt.model.incremental import DecoderCache

AttentionMaps = dict[str, list[torch.Tensor]]
"""{"encoder": [...], "decoder_self": [...], "cross": [...]}: per layer weights [B, H, Tq, Tk]."""


class _Sublayers(nn.Module):
    """Residual wiring: post-norm LN(x + drop(f(x))) or pre-norm x + drop(f(LN(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.dropout = Dropout(cfg.dropout)

    def _pre(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return norm(x) if self.norm_first else x

    def _post(self, x: torch.Tensor, h: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        x = x + self.dropout(h)
        return x if self.norm_first else norm(x)


class EncoderLayer(_Sublayers):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.self_attn = SelfAttention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, maps: AttentionMaps | None = None
    ) -> torch.Tensor:
        """x [B, S, D], mask [B, 1, 1, S] (True = attend) or None; maps given: weights appended."""
        h, weights = self.self_attn(self._pre(x, self.norm1), mask, need_weights=maps is not None)
        x = self._post(x, h, self.norm1)
        x = self._post(x, self.ff(self._pre(x, self.norm2)), self.norm2)
        if maps is not None:
            maps["encoder"].append(weights)
        return x


class DecoderLayer(_Sublayers):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.self_attn = SelfAttention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.norm3 = nn.LayerNorm(cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        mem_mask: torch.Tensor | None,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """x [B, T, D] (causal), memory [B, S, D], mem_mask [B, 1, 1, S] (True = attend) or None."""
        explicit = maps is not None
        h, self_weights = self.self_attn(
            self._pre(x, self.norm1), causal=True, need_weights=explicit
        )
        x = self._post(x, h, self.norm1)
        h, cross_weights = self.cross_attn(
            self._pre(x, self.norm2), memory, mem_mask, need_weights=explicit
        )
        x = self._post(x, h, self.norm2)
        x = self._post(x, self.ff(self._pre(x, self.norm3)), self.norm3)
        if maps is not None:
            maps["decoder_self"].append(self_weights)
            maps["cross"].append(cross_weights)
        return x

    def step(self, x: torch.Tensor, cache: DecoderCache, layer: int) -> torch.Tensor:
        """x [R, 1, D] at position cache.length -> [R, 1, D]; ``layer``: this layer's index in the
        cache."""
        x = self._post(x, self.self_attn.step(self._pre(x, self.norm1), cache, layer), self.norm1)
        x = self._post(x, self.cross_attn.step(self._pre(x, self.norm2), cache, layer), self.norm2)
        return self._post(x, self.ff(self._pre(x, self.norm3)), self.norm3)
