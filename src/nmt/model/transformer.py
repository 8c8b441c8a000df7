"""Encoder/decoder stacks, the output projection on top, and the encoder-decoder Transformer with
explicit encode()/decode()/decode_step()."""

from __future__ import annotations

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.errors import NMTError
from nmt.model.attention import attend_mask
from nmt.model.cpu_kernels import Linear
from nmt.model.embeddings import TransformerEmbedding, make_token_embedding
from nmt.model.incremental import DecoderCache
from nmt.model.layers import AttentionMaps, DecoderLayer, EncoderLayer
from nmt.special import PAD_ID


def _final_norm(cfg: ModelConfig) -> nn.Module:
    # pre-norm leaves the residual stream unnormalised, so each stack ends with a LayerNorm
    return nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, token: nn.Embedding) -> None:
        super().__init__()
        self.embed = TransformerEmbedding(token, cfg.max_positions, cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.final_norm = _final_norm(cfg)

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor | None, maps: AttentionMaps | None = None
    ) -> torch.Tensor:
        """src [B, S], mask [B, 1, 1, S] (True = attend) or None -> [B, S, D]."""
        x = self.embed(src)
        for layer in self.layers:
            x = layer(x, mask, maps)
        return self.final_norm(x)


class Decoder(nn.Module):
    """The decoder stack; without ``cross_attention`` it reads no encoder output (decoder-only)."""

    def __init__(self, cfg: ModelConfig, token: nn.Embedding, cross_attention: bool = True) -> None:
        super().__init__()
        self.embed = TransformerEmbedding(token, cfg.max_positions, cfg.dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cross_attention) for _ in range(cfg.decoder_layers)
        )
        self.final_norm = _final_norm(cfg)

    def forward(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor | None = None,
        mem_mask: torch.Tensor | None = None,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """tgt_in [B, T] -> hidden [B, T, D]; right padding needs no mask beyond the causal one."""
        return self.run(self.embed(tgt_in), None, memory, mem_mask, maps)

    def run(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor | None,
        memory: torch.Tensor | None = None,
        mem_mask: torch.Tensor | None = None,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """Embedded inputs x [B, T, D] -> hidden [B, T, D]; self_mask [B, 1, T, T] (True = attend),
        None for the causal mask."""
        for layer in self.layers:
            x = layer(x, memory, mem_mask, maps, self_mask)
        return self.final_norm(x)

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor, cache: DecoderCache) -> None:
        """tokens [B, P] at positions 0..P-1 of an empty cache, read in one pass with self-attention
        mask [B, 1, P, P] (True = attend); the cache then holds them, and the next ``step`` is at
        position P (less the row's prefix padding)."""
        x = self.embed(tokens)
        cache.start_prefix(tokens.size(1))
        for i, layer in enumerate(self.layers):
            x = layer.prefill(x, mask, cache, i)
        cache.finish_step(tokens.size(1))

    def step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens [R] at position cache.length -> hidden [R, D]; advances the cache."""
        x = self.embed(tokens[:, None], cache.length, cache.position_shift())  # [R, 1, D]
        cache.start_step()
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache, i)
        cache.finish_step()
        return self.final_norm(x[:, 0])


def output_projection(cfg: ModelConfig, token: nn.Embedding) -> Linear:
    """The head: hidden [.., D] -> logits over ``token``'s vocabulary, its weight tied to the
    embedding with ``cfg.tie_embeddings``."""
    vocab_size, d_model = token.weight.shape
    proj = Linear(d_model, vocab_size, bias=False)
    if cfg.tie_embeddings:
        proj.weight = token.weight
    else:
        # same init and reasoning as the embeddings: unit-variance logits at the start
        nn.init.normal_(proj.weight, mean=0.0, std=d_model**-0.5)
    return proj


class Transformer(nn.Module):
    """Encoder-decoder Transformer (Vaswani et al., 2017) producing target-vocabulary logits."""

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__()
        if cfg.tie_embeddings and src_vocab_size != tgt_vocab_size:
            raise NMTError(
                f"model.tie_embeddings needs equal vocabularies, got source {src_vocab_size} "
                f"and target {tgt_vocab_size} (use tokenizer.joint=true)"
            )
        src_token = make_token_embedding(src_vocab_size, cfg.d_model)
        tgt_token = (
            src_token if cfg.tie_embeddings else make_token_embedding(tgt_vocab_size, cfg.d_model)
        )
        self.max_positions = cfg.max_positions  # longest input of either stack, BOS/EOS included
        self.encoder = Encoder(cfg, src_token)
        self.decoder = Decoder(cfg, tgt_token)
        self.output_proj = output_projection(cfg, tgt_token)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src [B, S], tgt_in [B, T] -> logits [B, T, V]; padding masks from PAD_ID."""
        mask = attend_mask(src.eq(PAD_ID))
        return self.output_proj(self.decoder(tgt_in, self.encoder(src, mask), mask))

    def target_states(
        self, src: torch.Tensor, tgt_in: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Final decoder states [N, D] at ``positions`` (Long [N], flat indices into B*T).

        Training passes the non-pad positions and applies ``output_proj`` inside the loss, block
        by block (``nmt.loss``): the projection is the largest matmul per target position, and
        padded rows would only be thrown away.
        """
        mask = attend_mask(src.eq(PAD_ID))
        hidden = self.decoder(tgt_in, self.encoder(src, mask), mask)  # [B, T, D]
        return hidden.flatten(0, 1).index_select(0, positions)

    def encode(
        self, src: torch.Tensor, src_pad_mask: torch.Tensor, maps: AttentionMaps | None = None
    ) -> torch.Tensor:
        """src [B, S], src_pad_mask [B, S] (True at padding) -> memory [B, S, D]."""
        return self.encoder(src, attend_mask(src_pad_mask), maps)

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        src_pad_mask: torch.Tensor,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """tgt_in [B, T] -> logits [B, T, V] for every position (teacher forcing)."""
        return self.output_proj(self.decoder(tgt_in, memory, attend_mask(src_pad_mask), maps))

    def init_cache(
        self, memory: torch.Tensor, src_pad_mask: torch.Tensor, max_len: int = 0
    ) -> DecoderCache:
        """Cross-attention K/V of every decoder layer, computed once per sentence; one decoder row
        per sentence until ``cache.expand(beam)``. max_len: decoder positions to make room for up
        front, as growing the buffer copies it; more are still possible."""
        cross_kv = torch.stack(
            [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]
        )  # [L, 2, B, H, S, dk]
        layers, _, sentences, heads, _, d_k = cross_kv.shape
        return DecoderCache((layers, sentences, heads, d_k), cross_kv.dtype, memory.device, max_len,
                            cross_kv, attend_mask(src_pad_mask))

    def decode_step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens [B * beam] (BOS first) -> next-token logits [B * beam, V]; appends to the cache."""
        return self.output_proj(self.decoder.step(tokens, cache))

    @torch.no_grad()
    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> AttentionMaps:
        """Per-layer attention weights [B, H, Tq, Tk] in eval mode (``attention_with_weights``)."""
        maps: AttentionMaps = {"encoder": [], "decoder_self": [], "cross": []}
        was_training = self.training
        self.eval()
        try:
            src_pad_mask = src.eq(PAD_ID)
            self.decode(tgt_in, self.encode(src, src_pad_mask, maps), src_pad_mask, maps)
        finally:
            self.train(was_training)
        return maps


def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
