"""A decoder-only translator: one decoder stack without cross-attention reads ``source </s> <s>
target`` as one sequence and predicts the target, as GPT translates from a prompt.

The source keeps its own EOS as the separator and the target its BOS, so batches and the search
need nothing new. Batches pad each source on the right, which leaves a gap of padding between a
short source and its target: the gap is masked as keys and left out of the positions (the target
starts at the source's length, EOS included), so a sentence's output does not depend on the batch
it is in. The source's attention pattern is causal or, as a prefix LM, bidirectional within the
source (``model.source_attention``); the target is causal and sees the whole source.

Decoding has the encoder-decoder's interface: ``encode`` hands the source on, ``init_cache`` reads
it into the cache in one pass, then ``decode_step`` extends the target one token at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.errors import NMTError
from nmt.model.embeddings import make_token_embedding
from nmt.model.incremental import DecoderCache
from nmt.model.layers import AttentionMaps
from nmt.model.transformer import Decoder, output_projection
from nmt.special import PAD_ID


def sequence_mask(src_pad: torch.Tensor, tgt_len: int, bidirectional_source: bool) -> torch.Tensor:
    """Self-attention mask [B, 1, S+T, S+T] (True = attend) over sources src_pad [B, S] (True at
    padding) followed by T target positions: causal, the source's padding never attended, and with
    ``bidirectional_source`` every source position attending to the whole source."""
    src_len = src_pad.size(1)
    length = src_len + tgt_len
    index = torch.arange(length, device=src_pad.device)
    allowed = index[None, :] <= index[:, None]  # [L, L] causal (query row, key column)
    if bidirectional_source:
        in_source = index < src_len
        allowed = allowed | (in_source[:, None] & in_source[None, :])
    real_keys = torch.cat([~src_pad, src_pad.new_ones(src_pad.size(0), tgt_len)], dim=1)  # [B, L]
    return allowed[None, None] & real_keys[:, None, None, :]


class DecoderOnlyTransformer(nn.Module):
    """Decoder stack without cross-attention and the output projection on top; target-vocabulary
    logits of the target positions."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__()
        if src_vocab_size != tgt_vocab_size:
            raise NMTError(
                f"model.arch=decoder_only needs one vocabulary for source and target, got source "
                f"{src_vocab_size} and target {tgt_vocab_size} (use tokenizer.joint=true)"
            )
        token = make_token_embedding(tgt_vocab_size, cfg.d_model)
        # Longest source (EOS included) or target (BOS included): half the stack's positions each,
        # so that both fit together. Translation truncates sources to it and caps outputs below it.
        self.max_positions = cfg.max_positions // 2
        self.bidirectional_source = cfg.source_attention == "bidirectional"
        self.decoder = Decoder(cfg, token, cross_attention=False)
        self.output_proj = output_projection(cfg, token)

    def sequence_states(
        self, src: torch.Tensor, src_pad: torch.Tensor, tgt_in: torch.Tensor
    ) -> torch.Tensor:
        """src [B, S] (src_pad [B, S] True at padding), tgt_in [B, T] -> final states [B, S+T, D]
        of the one sequence ``src tgt_in``."""
        embed, src_len = self.decoder.embed, src.size(1)
        gap = src_pad.sum(dim=1)  # [B] padding between a source and its target
        x = torch.cat([embed(src), embed(tgt_in, src_len, gap)], dim=1)  # [B, S+T, D]
        return self.decoder.run(x, sequence_mask(src_pad, tgt_in.size(1), self.bidirectional_source))

    def _target_hidden(self, src: torch.Tensor, src_pad: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Final states [B, T, D] of the target positions."""
        return self.sequence_states(src, src_pad, tgt_in)[:, src.size(1):]

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src [B, S] (EOS-terminated), tgt_in [B, T] (BOS first) -> logits [B, T, V]."""
        return self.output_proj(self._target_hidden(src, src.eq(PAD_ID), tgt_in))

    def target_states(
        self, src: torch.Tensor, tgt_in: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Final states [N, D] at ``positions`` (Long [N], flat indices into B*T of tgt_in): the
        loss covers the target only (see ``Transformer.target_states``)."""
        hidden = self._target_hidden(src, src.eq(PAD_ID), tgt_in)  # [B, T, D]
        return hidden.flatten(0, 1).index_select(0, positions)

    def encode(
        self, src: torch.Tensor, src_pad_mask: torch.Tensor, maps: AttentionMaps | None = None
    ) -> torch.Tensor:
        """No encoder: the source [B, S] itself is the memory, read by ``decode`` or
        ``init_cache`` as the prefix of the one stack."""
        return src

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        src_pad_mask: torch.Tensor,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """tgt_in [B, T] after the source ``memory`` [B, S] -> logits [B, T, V] (teacher forcing)."""
        return self.output_proj(self._target_hidden(memory, src_pad_mask, tgt_in))

    def init_cache(
        self, memory: torch.Tensor, src_pad_mask: torch.Tensor, max_len: int = 0
    ) -> DecoderCache:
        """The source ``memory`` [B, S] read in one pass into a new cache (one row per sentence
        until ``cache.expand(beam)``), with room for ``max_len`` target positions after it."""
        mask = sequence_mask(src_pad_mask, 0, self.bidirectional_source)  # [B, 1, S, S]
        return self._prefilled(memory, src_pad_mask, mask, max_len)

    def prompt_cache(self, prompt: torch.Tensor, max_len: int = 0) -> DecoderCache:
        """A sequence to continue, prompt [B, P] without padding (a language model's ``</s> <s>
        text``: source and target already joined), read causally in one pass into a new cache with
        room for ``max_len`` positions after it; ``decode_step`` then takes the next token."""
        pad = torch.zeros_like(prompt, dtype=torch.bool)
        return self._prefilled(prompt, pad, sequence_mask(pad, 0, False), max_len)

    def _prefilled(self, tokens: torch.Tensor, pad: torch.Tensor, mask: torch.Tensor, max_len: int) -> DecoderCache:
        """tokens [B, P] (pad [B, P] True at padding) read with mask [B, 1, P, P] into a new cache."""
        layers, sentences = len(self.decoder.layers), tokens.size(0)
        attn = self.decoder.layers[0].self_attn
        heads, d_k = attn.heads, self.output_proj.in_features // attn.heads
        device = tokens.device
        # the keys and values come out of the projections in the autocast dtype, if any
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.output_proj.weight.dtype)
        cache = DecoderCache((layers, sentences, heads, d_k), dtype, device, tokens.size(1) + max_len,
                             prefix_pad=pad)
        self.decoder.prefill(tokens, mask, cache)
        return cache

    def decode_step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens [B * beam] (BOS first) -> next-token logits [B * beam, V]; appends to the cache."""
        return self.output_proj(self.decoder.step(tokens, cache))

    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> AttentionMaps:
        raise NMTError("attention maps show cross-attention: they need model.arch=encoder_decoder")
