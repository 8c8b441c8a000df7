"""The encoder-decoder Transformer and its incremental-decoding cache."""

from __future__ import annotations

from nmt.model.incremental import DecoderCache
from nmt.model.layers import AttentionMaps
from nmt.model.transformer import Transformer, build_model, count_parameters

__all__ = ["AttentionMaps", "DecoderCache", "Transformer", "build_model", "count_parameters"]
