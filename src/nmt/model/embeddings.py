"""Token embeddings scaled by sqrt(d_model), plus sinusoidal positional encodings and dropout."""

from __future__ import annotations

import math

import torch
from torch import nn

from nmt.errors import NMTError
from nmt.model.cpu_kernels import Dropout
from nmt.special import PAD_ID


def sinusoidal_table(max_positions: int, d_model: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same); shape [max_positions, d_model]."""
    # float64 so that angles at large positions are exact before rounding to float32
    positions = torch.arange(max_positions, dtype=torch.float64)[:, None]
    even_dims = torch.arange(0, d_model, 2, dtype=torch.float64)
    angles = positions / torch.pow(10000.0, even_dims / d_model)  # [P, ceil(d/2)]
    table = torch.zeros(max_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.float()


def make_token_embedding(vocab_size: int, d_model: int) -> nn.Embedding:
    """Embedding table initialised N(0, d_model^-0.5), PAD row zero."""
    embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
    # std d^-0.5: after the sqrt(d) scale the inputs have unit variance, like the PE terms; used as the
    # (tied) output projection it gives unit-variance logits for layer-normed hidden states.
    nn.init.normal_(embedding.weight, mean=0.0, std=d_model**-0.5)
    with torch.no_grad():
        embedding.weight[PAD_ID].zero_()
    return embedding


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal table, a non-persistent buffer (rebuilt, never stored in checkpoints)."""

    pe: torch.Tensor

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoidal_table(max_positions, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Rows offset .. offset+length-1, shape [length, d_model]; with shift (Long [B], >= 0) row
        b takes the positions shift[b] lower, shape [B, length, d_model]."""
        end = offset + length
        if end > self.pe.size(0):
            raise NMTError(f"sequence length {end} exceeds model.max_positions ({self.pe.size(0)})")
        if shift is None:
            return self.pe[offset:end]
        positions = torch.arange(offset, end, device=shift.device) - shift[:, None]  # [B, length]
        return self.pe[positions]


class TransformerEmbedding(nn.Module):
    """dropout(token_embedding * sqrt(d_model) + PE)."""

    def __init__(self, token: nn.Embedding, max_positions: int, dropout: float) -> None:
        super().__init__()
        self.token = token
        self.scale = math.sqrt(token.embedding_dim)
        self.positions = PositionalEncoding(token.embedding_dim, max_positions)
        self.dropout = Dropout(dropout)

    def forward(self, tokens: torch.Tensor, offset: int = 0, shift: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] at positions offset.. (row b shift[b] lower, when given) -> [B, T, D]."""
        x = self.token(tokens) * self.scale + self.positions(tokens.size(1), offset, shift)
        return self.dropout(x)
