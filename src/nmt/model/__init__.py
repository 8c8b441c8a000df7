"""The Transformer's stacks and models, by architecture (``model.arch``), and the
incremental-decoding cache."""

from __future__ import annotations

from torch import nn

from nmt.config import ModelConfig
from nmt.model.decoder_only import DecoderOnlyTransformer
from nmt.model.encoder_only import EncoderOnlyTransformer
from nmt.model.incremental import DecoderCache
from nmt.model.layers import AttentionMaps
from nmt.model.transformer import Transformer, count_parameters

ARCHS: dict[str, type[nn.Module]] = {"encoder_decoder": Transformer, "decoder_only": DecoderOnlyTransformer,
                                     "encoder_only": EncoderOnlyTransformer}
"""``model.arch`` -> the model class; each takes (cfg, src_vocab_size, tgt_vocab_size)."""


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> nn.Module:
    return ARCHS[cfg.arch](cfg, src_vocab_size, tgt_vocab_size)


__all__ = ["ARCHS", "AttentionMaps", "DecoderCache", "DecoderOnlyTransformer", "EncoderOnlyTransformer",
           "Transformer", "build_model", "count_parameters"]
