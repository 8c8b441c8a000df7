"""Multi-head scaled dot-product attention: softmax(QK^T / sqrt(d_k)) V over ``heads`` heads."""

from __future__ import annotations

import torch
from torch import nn

from nmt.model.cpu_kernels import Linear, scaled_dot_product_attention


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> float mask, 0 to attend and -inf not. Decoding builds one per
    step and reuses it over layers, where a bool mask would cost a negation and a masked copy of
    the scores in every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """softmax(QK^T / sqrt(d_k)) spelled out, for the attention maps: q [B, H, Tq, dk], k [B, H, Tk, dk],
    mask broadcastable to [B, H, Tq, Tk] (True = attend) -> weights [B, H, Tq, Tk]."""
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    if causal:
        future = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def split_heads(y: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """Fused projection [B, T, n*D] -> [n, B, H, T, d_k]."""
    return y.unflatten(-1, (n, heads, -1)).permute(2, 0, 3, 1, 4)


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

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [B, H, Tq, dk], k/v [B, H, Tk, dk]; mask broadcastable to [B, H, Tq, Tk], bool
        (True = attend) or additive; causal: Tq == Tk, no mask. -> ([B, Tq, D], weights or None)."""
        weights = None
        if need_weights:  # the maps: the same attention, computed step by step to keep the weights
            weights = attention_weights(q, k, mask, causal)
            out = weights @ v
        else:
            p = self.dropout if self.training else 0.0
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).flatten(2)), weights  # [B, H, T, dk] -> [B, T, D]


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
        return self._attend(q, k, v, mask, causal, need_weights)

    def step(
        self, x: torch.Tensor, kv_buffer: torch.Tensor, pos: int, history: torch.Tensor | None
    ) -> torch.Tensor:
        """One new position: x [B*g, 1, D], g rows per sentence; their K/V are written to
        kv_buffer [2, B, H, capacity, g, dk] at pos; history [B, 1, g, (pos+1)*g] or None (g = 1)
        says which slots hold each row's past."""
        _, sentences, heads, _, group, d_k = kv_buffer.shape
        # [B*g, 1, 3D] -> [B, g, 3, H, dk] -> [3, B, H, g, dk]
        qkv = self.qkv(x).view(sentences, group, 3, heads, d_k).permute(2, 0, 3, 1, 4)
        kv_buffer[:, :, :, pos] = qkv[1:]
        # [B, H, pos+1, g, dk] -> [B, H, (pos+1)*g, dk]: every slot of every past position, a view
        keys, values = kv_buffer[:, :, :, : pos + 1].flatten(3, 4)
        out, _ = self._attend(qkv[0], keys.to(qkv.dtype), values.to(qkv.dtype), history)
        return out.view(x.shape)  # [B, g, D] -> [B*g, 1, D]


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
        kv: torch.Tensor,
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B*g, T, D], kv [2, B, H, S, dk] -> ([B*g, T, D], weights [B, H, g*T, S] or None).

        g >= 1 consecutive rows of x (a sentence's beam hypotheses) share one source's K/V: their
        queries are attended together, so the K/V are read once per sentence, not once per row.
        """
        sentences, heads = kv.size(1), self.heads
        # [B*g, T, D] -> [B, g*T, H, dk] -> [B, H, g*T, dk]: every query of a sentence in one row
        q = self.q_proj(x).view(sentences, -1, heads, x.size(-1) // heads).transpose(1, 2)
        out, weights = self._attend(
            q, kv[0].to(q.dtype), kv[1].to(q.dtype), mask, need_weights=need_weights
        )
        return out.view(x.shape), weights  # [B, g*T, D] -> [B*g, T, D]
