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
    """Masked self-attention, then (with ``cross_attention``) attention over the encoder's output,
    then the feed-forward network. Without cross-attention it is a GPT block: the layer of a
    decoder-only model."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool = True) -> None:
        super().__init__(cfg)
        self.self_attn = SelfAttention(cfg.d_model, cfg.heads, cfg.attention_dropout)
        self.cross_attn = (
            CrossAttention(cfg.d_model, cfg.heads, cfg.attention_dropout) if cross_attention else None
        )
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        # no norm2 without cross-attention; norm3 keeps its name, so both layouts name shared weights alike
        self.norm2 = nn.LayerNorm(cfg.d_model) if cross_attention else None
        self.norm3 = nn.LayerNorm(cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        mem_mask: torch.Tensor | None = None,
        maps: AttentionMaps | None = None,
        self_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, D], memory [B, S, D] (None without cross-attention), mem_mask [B, 1, 1, S]
        (True = attend) or None; self_mask [B, 1, T, T] (True = attend) replaces the causal mask."""
        explicit = maps is not None
        h, self_weights = self.self_attn(
            self._pre(x, self.norm1), self_mask, causal=self_mask is None, need_weights=explicit
        )
        x = self._post(x, h, self.norm1)
        if self.cross_attn is not None:
            assert memory is not None
            h, cross_weights = self.cross_attn(
                self._pre(x, self.norm2), memory, mem_mask, need_weights=explicit
            )
            x = self._post(x, h, self.norm2)
            if maps is not None:
                maps["cross"].append(cross_weights)
        x = self._post(x, self.ff(self._pre(x, self.norm3)), self.norm3)
        if maps is not None:
            maps["decoder_self"].append(self_weights)
        return x

    def step(self, x: torch.Tensor, cache: DecoderCache, layer: int) -> torch.Tensor:
        """x [R, 1, D] at position cache.length -> [R, 1, D]; ``layer``: this layer's index in the
        cache."""
        x = self._post(x, self.self_attn.step(self._pre(x, self.norm1), cache, layer), self.norm1)
        if self.cross_attn is not None:
            x = self._post(x, self.cross_attn.step(self._pre(x, self.norm2), cache, layer), self.norm2)
        return self._post(x, self.ff(self._pre(x, self.norm3)), self.norm3)

    def prefill(
        self, x: torch.Tensor, mask: torch.Tensor, cache: DecoderCache, layer: int
    ) -> torch.Tensor:
        """x [B, P, D]: a prefix (positions 0..P-1) in one pass, mask [B, 1, P, P] (True = attend)
        -> [B, P, D]; its self-attention keys and values go into the cache. Layers without
        cross-attention only: a decoder-only model's source."""
        assert self.cross_attn is None, "prefill reads a prefix without a source"
        x = self._post(x, self.self_attn.prefill(self._pre(x, self.norm1), mask, cache, layer), self.norm1)
        return self._post(x, self.ff(self._pre(x, self.norm3)), self.norm3)
