"""Encoder/decoder stacks, the Transformer, and the incremental-decoding cache."""

from __future__ import annotations

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.errors import NMTError
from nmt.model.embeddings import TransformerEmbedding, make_token_embedding
from nmt.model.layers import AttentionMaps, DecoderLayer, EncoderLayer
from nmt.model.linear import Linear
from nmt.tokenizer import PAD_ID


def attend_mask(src_pad_mask: torch.Tensor) -> torch.Tensor:
    """Padding mask [B, S] (True at PAD) -> SDPA mask [B, 1, 1, S] (True = attend)."""
    return ~src_pad_mask[:, None, None, :]


def _final_norm(cfg: ModelConfig) -> nn.Module:
    # pre-norm leaves the residual stream unnormalised, so each stack ends with a LayerNorm
    return nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()


class DecoderCache:
    """Per-sentence decoder state for incremental decoding.

    cross_kv: [L, 2, B, H, S, dk], computed once; self_kv: [L, 2, B, H, capacity, dk], filled up to
    ``length`` and doubled when full, so a step never copies the whole history.
    """

    def __init__(self, cross_kv: torch.Tensor, mem_mask: torch.Tensor) -> None:
        self.cross_kv = cross_kv
        self.mem_mask = mem_mask  # [B, 1, 1, S], True = attend
        self.self_kv: torch.Tensor | None = None
        # reorder gathers into this second buffer and the two swap: no allocation per step
        self._spare: torch.Tensor | None = None
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.cross_kv.size(2)

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in the self-attention buffer."""
        if self.self_kv is not None and self.self_kv.size(4) >= length:
            return
        capacity = (
            max(16, length) if self.self_kv is None else max(2 * self.self_kv.size(4), length)
        )
        layers, _, batch, heads, _, d_k = self.cross_kv.shape
        grown = self.cross_kv.new_empty(layers, 2, batch, heads, capacity, d_k)
        if self.self_kv is not None:
            grown[..., : self.length, :] = self.self_kv[..., : self.length, :]
        self.self_kv, self._spare = grown, None

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        """Keep batch rows ``index`` (Long [B']) in place; rows may repeat, be dropped or permuted.

        same_sources: every row of ``index`` reads the same source sentence as the row it replaces
        (beam search reordering hypotheses within their sentences), so the cross-attention K/V, a
        function of the source only, stay as they are: gathering them each step cost up to a third
        of beam search.
        """
        if not same_sources:
            self.cross_kv = self.cross_kv.index_select(2, index)
            self.mem_mask = self.mem_mask.index_select(0, index)
        if self.self_kv is not None:
            self._gather_self_kv(index)

    def _gather_self_kv(self, index: torch.Tensor) -> None:
        """Copy only the filled positions of rows ``index`` into the spare buffer, then swap.

        Gathering the whole buffer (filled or not) into a new tensor cost a fifth of beam search.
        """
        assert self.self_kv is not None
        layers, _, _, heads, capacity, d_k = self.self_kv.shape
        rows = index.numel()
        if self._spare is None or self._spare.size(2) < rows:
            self._spare = self.self_kv.new_empty(layers, 2, rows, heads, capacity, d_k)
        target = self._spare[:, :, :rows]  # [L, 2, B', H, capacity, dk]
        filled = self.self_kv[..., : self.length, :]
        torch.index_select(filled, 2, index, out=target[..., : self.length, :])
        self._spare, self.self_kv = self.self_kv, target


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, token: nn.Embedding) -> None:
        super().__init__()
        self.embed = TransformerEmbedding(token, cfg.max_positions, cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.final_norm = _final_norm(cfg)

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor, maps: AttentionMaps | None = None
    ) -> torch.Tensor:
        """src [B, S], mask [B, 1, 1, S] (True = attend) -> [B, S, D]."""
        x = self.embed(src)
        for layer in self.layers:
            x = layer(x, mask, maps)
        return self.final_norm(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, token: nn.Embedding) -> None:
        super().__init__()
        self.embed = TransformerEmbedding(token, cfg.max_positions, cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.final_norm = _final_norm(cfg)

    def forward(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        mem_mask: torch.Tensor,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """tgt_in [B, T] -> hidden [B, T, D]; right padding needs no mask beyond the causal one."""
        x = self.embed(tgt_in)
        for layer in self.layers:
            x = layer(x, memory, mem_mask, maps)
        return self.final_norm(x)

    def step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens [B] at position cache.length -> hidden [B, D]; advances the cache."""
        pos = cache.length
        x = self.embed(tokens[:, None], offset=pos)  # [B, 1, D]
        cache.reserve(pos + 1)
        assert cache.self_kv is not None
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache.self_kv[i], pos, cache.cross_kv[i], cache.mem_mask)
        cache.length = pos + 1
        return self.final_norm(x[:, 0])


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
        self.encoder = Encoder(cfg, src_token)
        self.decoder = Decoder(cfg, tgt_token)
        self.output_proj = Linear(cfg.d_model, tgt_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output_proj.weight = tgt_token.weight
        else:
            # same init and reasoning as the embeddings: unit-variance logits at the start
            nn.init.normal_(self.output_proj.weight, mean=0.0, std=cfg.d_model**-0.5)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src [B, S], tgt_in [B, T] -> logits [B, T, V]; padding masks from PAD_ID."""
        src_pad_mask = src.eq(PAD_ID)
        return self.decode(tgt_in, self.encode(src, src_pad_mask), src_pad_mask)

    def target_states(
        self, src: torch.Tensor, tgt_in: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Final decoder states [N, D] at ``positions`` (Long [N], flat indices into B*T).

        Training passes the non-pad positions and applies ``output_proj`` inside the loss, block
        by block (``nmt.loss``): the projection is the largest matmul per target position, and
        padded rows would only be thrown away.
        """
        src_pad_mask = src.eq(PAD_ID)
        memory = self.encode(src, src_pad_mask)
        hidden = self.decoder(tgt_in, memory, attend_mask(src_pad_mask))  # [B, T, D]
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

    def init_cache(self, memory: torch.Tensor, src_pad_mask: torch.Tensor) -> DecoderCache:
        """Cross-attention K/V of every decoder layer, computed once per sentence."""
        cross_kv = torch.stack(
            [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]
        )
        return DecoderCache(cross_kv, attend_mask(src_pad_mask))

    def decode_step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens [B] (BOS first) -> next-token logits [B, V]; appends to the cache."""
        return self.output_proj(self.decoder.step(tokens, cache))

    @torch.no_grad()
    def attention_maps(self, src: torch.Tensor, tgt_in: torch.Tensor) -> AttentionMaps:
        """Per-layer attention weights [B, H, Tq, Tk] in eval mode (explicit softmax path)."""
        maps: AttentionMaps = {"encoder": [], "decoder_self": [], "cross": []}
        was_training = self.training
        self.eval()
        try:
            src_pad_mask = src.eq(PAD_ID)
            self.decode(tgt_in, self.encode(src, src_pad_mask, maps), src_pad_mask, maps)
        finally:
            self.train(was_training)
        return maps


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Transformer:
    return Transformer(cfg, src_vocab_size, tgt_vocab_size)


def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
