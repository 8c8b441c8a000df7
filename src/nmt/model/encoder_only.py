"""An encoder-only model (BERT): the encoder stack reads the whole sentence in both directions, and
a head on top predicts the token at each position, trained on masked positions (``nmt.masking``).

The stack is the encoder-decoder's ``Encoder`` (embeddings, positions, layers and, with pre-norm,
its final LayerNorm) under the same parameter names, so that its weights initialise a translator's
encoder (``train.init_from``). The head is the output projection, tied to the embeddings with
``model.tie_embeddings``.
"""

from __future__ import annotations

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.model.attention import attend_mask
from nmt.model.embeddings import make_token_embedding
from nmt.model.layers import AttentionMaps
from nmt.model.transformer import Encoder, output_projection


class EncoderOnlyTransformer(nn.Module):
    """Encoder stack and the output projection on top; vocabulary logits at every position."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__()
        token = make_token_embedding(src_vocab_size, cfg.d_model)  # the text is the source side
        self.max_positions = cfg.max_positions
        self.encoder = Encoder(cfg, token)
        self.output_proj = output_projection(cfg, token)

    def encode(
        self, src: torch.Tensor, src_pad_mask: torch.Tensor, maps: AttentionMaps | None = None
    ) -> torch.Tensor:
        """src [B, S], src_pad_mask [B, S] (True at padding) -> final states [B, S, D]."""
        return self.encoder(src, attend_mask(src_pad_mask), maps)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """States [.., D] -> vocabulary logits [.., V]."""
        return self.output_proj(hidden)

    def masked_states(self, src: torch.Tensor, src_pad_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final states [N, D] at ``positions`` (Long [N], flat indices into B*S): the masked
        positions, which training projects inside the fused loss (``nmt.loss``)."""
        return self.encode(src, src_pad_mask).flatten(0, 1).index_select(0, positions)
