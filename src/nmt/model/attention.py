"""Multi-head attention (Vaswani et al., 2017, section 3.2): project queries, keys and values, split
them into ``heads`` heads, softmax(QK^T / sqrt(d_k)) V per head, merge the heads, project with W_O."""

from __future__ import annotations

import torch
from torch import nn

from nmt.model.cpu_kernels import Linear, attention_with_weights, scaled_dot_product_attention
from nmt.model.incremental import DecoderCache


def attend_mask(pad_mask: torch.Tensor) -> torch.Tensor:
    """Padding mask [B, S] (True at PAD) -> mask over the keys [B, 1, 1, S] (True = attend).

    Bool and broadcast over heads and queries rather than materialised: the form SDPA's
    memory-efficient CUDA kernel accepts. Always a mask, even when nothing is padded: finding that
    out would cost a host sync per batch (and a graph break when compiled)."""
    return ~pad_mask[:, None, None, :]


def split_heads(y: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """Projection of n fused inputs [B, T, n*D] -> [n, B, H, T, d_k] (a view)."""
    return y.unflatten(-1, (n, heads, -1)).permute(2, 0, 3, 1, 4)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d_k] -> [B, T, D]."""
    return y.transpose(1, 2).flatten(2)


def _xavier_fused(linear: nn.Linear, n: int) -> None:
    """Xavier-uniform per [D, D] block, so a fused projection is initialised like n separate ones."""
    for block in linear.weight.chunk(n, dim=0):
        nn.init.xavier_uniform_(block)
    nn.init.zeros_(linear.bias)


class MultiHeadAttention(nn.Module):
    """Shared parts: head bookkeeping, attention dropout and the output projection W_O."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.out_proj = Linear(d_model, d_model)
        _xavier_fused(self.out_proj, 1)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [B, H, Tq, dk], k/v [B, H, Tk, dk]; mask [B, 1, 1, Tk] (True = attend) or None;
        causal: Tq == Tk, no mask -> (W_O of the merged heads [B, Tq, D], weights
        [B, H, Tq, Tk] if need_weights, else None)."""
        weights = None
        if need_weights:
            out, weights = attention_with_weights(q, k, v, mask, causal)
        else:
            p = self.dropout if self.training else 0.0
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out_proj(merge_heads(out)), weights


class SelfAttention(MultiHeadAttention):
    """Self-attention with one fused Q/K/V projection (d -> 3d)."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__(d_model, heads, dropout)
        self.qkv = Linear(d_model, 3 * d_model)
        _xavier_fused(self.qkv, 3)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] -> ([B, T, D], weights [B, H, T, T] or None)."""
        q, k, v = split_heads(self.qkv(x), 3, self.heads)
        return self.attend(q, k, v, mask, causal, need_weights)

    def prefill(
        self, x: torch.Tensor, mask: torch.Tensor, cache: DecoderCache, layer: int
    ) -> torch.Tensor:
        """x [B, P, D] at positions 0..P-1 of an empty cache, mask [B, 1, P, P] (True = attend) ->
        [B, P, D]; their keys and values stay in the cache for the steps after them."""
        q, k, v = split_heads(self.qkv(x), 3, self.heads)  # [B, H, P, dk] each
        cache.store_prefix(layer, k, v)
        return self.attend(q, k, v, mask)[0]

    def step(self, x: torch.Tensor, cache: DecoderCache, layer: int) -> torch.Tensor:
        """x [R, 1, D] at position cache.length -> [R, 1, D], attending over the positions before
        it and itself (the cache keeps their keys and values)."""
        q, k, v = split_heads(self.qkv(x), 3, self.heads)  # [R, H, 1, dk] each
        return self.out_proj(merge_heads(cache.attend_self(layer, q, k, v)))


class CrossAttention(MultiHeadAttention):
    """Encoder-decoder attention; K/V come from one fused projection (d -> 2d) of the memory."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__(d_model, heads, dropout)
        self.q_proj = Linear(d_model, d_model)
        self.kv_proj = Linear(d_model, 2 * d_model)
        _xavier_fused(self.q_proj, 1)
        _xavier_fused(self.kv_proj, 2)

    def project_kv(self, memory: torch.Tensor) -> torch.Tensor:
        """memory [B, S, D] -> K/V [2, B, H, S, dk] (computed once per sentence when decoding)."""
        return split_heads(self.kv_proj(memory), 2, self.heads)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D], memory [B, S, D] -> ([B, T, D], weights [B, H, T, S] or None)."""
        (q,) = split_heads(self.q_proj(x), 1, self.heads)
        k, v = self.project_kv(memory)
        return self.attend(q, k, v, mask, need_weights=need_weights)

    def step(self, x: torch.Tensor, cache: DecoderCache, layer: int) -> torch.Tensor:
        """x [R, 1, D] -> [R, 1, D], attending over the source K/V the cache holds."""
        (q,) = split_heads(self.q_proj(x), 1, self.heads)  # [R, H, 1, dk]
        return self.out_proj(merge_heads(cache.attend_memory(layer, q)))
