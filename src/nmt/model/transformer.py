"""Encoder/decoder stacks, the Transformer, and the incremental-decoding cache."""

from __future__ import annotations

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.errors import NMTError
from nmt.model.attention import additive_mask
from nmt.model.cpu_kernels import Linear
from nmt.model.embeddings import TransformerEmbedding, make_token_embedding
from nmt.model.layers import AttentionMaps, DecoderLayer, EncoderLayer
from nmt.tokenizer import PAD_ID


def attend_mask(src_pad_mask: torch.Tensor) -> torch.Tensor:
    """Padding mask [B, S] (True at PAD) -> attention mask [B, 1, 1, S] (True = attend)."""
    return ~src_pad_mask[:, None, None, :]


def key_padding_mask(src_pad_mask: torch.Tensor) -> torch.Tensor:
    """Padding mask [B, S] (True at PAD) -> the mask over the source keys in the form SDPA's fused
    CUDA kernels take: bool [B, 1, 1, S] (True = attend), broadcast over heads and queries rather
    than materialised, which the memory-efficient kernel accepts. Always a mask, even when nothing
    is padded: finding that out would cost a host sync per batch (and a graph break when compiled)."""
    return attend_mask(src_pad_mask)


def _final_norm(cfg: ModelConfig) -> nn.Module:
    # pre-norm leaves the residual stream unnormalised, so each stack ends with a LayerNorm
    return nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()


class DecoderCache:
    """Decoder state for incremental decoding of B sentences with ``beam`` consecutive rows each
    (one row until ``expand``).

    cross_kv: [L, 2, B, H, S, dk], computed once per sentence and shared by its rows.
    self_kv: [L, 2, B, H, capacity, beam, dk]: at each position, one slot per row of the sentence,
    filled up to ``length``; the capacity doubles when full, so a step never copies the history.
    slots: [B * beam, capacity] (long): for each row and position, the slot holding the row's own
    history there. Beam search moving a hypothesis to another row gathers these indexes, not the
    K/V; attention reads all slots of a sentence once and masks those off the row's history
    (instead of copying the history of every row at every step).
    """

    def __init__(self, cross_kv: torch.Tensor, mem_mask: torch.Tensor, max_len: int = 0) -> None:
        self.cross_kv = cross_kv
        self.mem_mask = additive_mask(mem_mask, cross_kv.dtype)  # [B, 1, 1, S], 0 = attend
        self.beam = 1
        self.self_kv: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.length = 0
        if max_len > 0:
            self.reserve(max_len)

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in the self-attention buffer."""
        if self.self_kv is not None and self.self_kv.size(4) >= length:
            return
        old = self.self_kv.size(4) if self.self_kv is not None else 0
        capacity = max(16, length, 2 * old)
        layers, _, sentences, heads, _, d_k = self.cross_kv.shape
        kv = self.cross_kv.new_empty(layers, 2, sentences, heads, capacity, self.beam, d_k)
        slots = torch.empty(sentences * self.beam, capacity, dtype=torch.long, device=kv.device)
        if self.self_kv is not None and self.slots is not None:
            kv[:, :, :, :, : self.length] = self.self_kv[:, :, :, :, : self.length]
            slots[:, : self.length] = self.slots[:, : self.length]
        self.self_kv, self.slots = kv, slots

    def expand(self, beam: int) -> None:
        """Give each sentence ``beam`` rows, all with the history of its one row so far. Beam
        search decodes its first step (every hypothesis is still BOS) once per sentence, then
        expands."""
        assert self.beam == 1, "only a cache with one row per sentence expands"
        self.beam = beam
        if self.self_kv is None or self.slots is None:
            return
        *outer, capacity, _, d_k = self.self_kv.shape
        kv = self.self_kv.new_empty(*outer, capacity, beam, d_k)
        # Every slot gets the copy, not just the one the history indexes point at (slot 0):
        # attention reads all slots of a position, and a masked slot's garbage values would still
        # enter the weighted sum (0 x NaN = NaN).
        kv[:, :, :, :, : self.length] = self.self_kv[:, :, :, :, : self.length]  # 1 -> beam slots
        self.self_kv, self.slots = kv, self.slots.repeat_interleave(beam, dim=0)

    def history_mask(self) -> torch.Tensor | None:
        """Additive mask [B, 1, beam, (length + 1) * beam] (0 = attend) over the K/V at positions
        0..length (the one being decoded included), position-major; None when beam == 1."""
        assert self.slots is not None
        rows, pos = self.slots.size(0), self.length
        self.slots[:, pos] = torch.arange(rows, device=self.slots.device) % self.beam  # own slot
        if self.beam == 1:
            return None
        own = self.slots[:, : pos + 1].view(-1, self.beam, pos + 1, 1)  # [B, beam, T, 1]
        every = torch.arange(self.beam, device=own.device)  # slots of the sentence at a position
        mine = (own == every).view(-1, 1, self.beam, (pos + 1) * self.beam)
        return additive_mask(mine, self.cross_kv.dtype)

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        """Keep rows ``index`` (Long [R']) in place; rows may repeat, be dropped or permuted.

        With beam > 1, rows move in whole sentences: the ``beam`` rows of each new sentence come
        from one old sentence (as when beam search drops finished sentences).
        same_sources: every row of ``index`` reads the same source sentence as the row it replaces
        (beam search reordering hypotheses within their sentences): no K/V moves then.
        """
        if not same_sources:
            sources = index.view(-1, self.beam)[:, 0] // self.beam  # [B'] sentence of each group
            self.cross_kv = self.cross_kv.index_select(2, sources)
            self.mem_mask = self.mem_mask.index_select(0, sources)
            if self.self_kv is not None:
                self.self_kv = self.self_kv.index_select(2, sources)
        if self.slots is not None:
            self.slots = self.slots.index_select(0, index)


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
    def __init__(self, cfg: ModelConfig, token: nn.Embedding) -> None:
        super().__init__()
        self.embed = TransformerEmbedding(token, cfg.max_positions, cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.final_norm = _final_norm(cfg)

    def forward(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        mem_mask: torch.Tensor | None,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """tgt_in [B, T] -> hidden [B, T, D]; right padding needs no mask beyond the causal one."""
        x = self.embed(tgt_in)
        for layer in self.layers:
            x = layer(x, memory, mem_mask, maps)
        return self.final_norm(x)

    def step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens [B * beam] at position cache.length -> hidden [B * beam, D]; advances the cache."""
        pos = cache.length
        x = self.embed(tokens[:, None], offset=pos)  # [B, 1, D]
        cache.reserve(pos + 1)
        history = cache.history_mask()
        assert cache.self_kv is not None
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache.self_kv[i], pos, history, cache.cross_kv[i], cache.mem_mask)
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
        mask = key_padding_mask(src.eq(PAD_ID))
        return self.output_proj(self.decoder(tgt_in, self.encoder(src, mask), mask))

    def target_states(
        self, src: torch.Tensor, tgt_in: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Final decoder states [N, D] at ``positions`` (Long [N], flat indices into B*T).

        Training passes the non-pad positions and applies ``output_proj`` inside the loss, block
        by block (``nmt.loss``): the projection is the largest matmul per target position, and
        padded rows would only be thrown away.
        """
        mask = key_padding_mask(src.eq(PAD_ID))
        hidden = self.decoder(tgt_in, self.encoder(src, mask), mask)  # [B, T, D]
        return hidden.flatten(0, 1).index_select(0, positions)

    def encode(
        self, src: torch.Tensor, src_pad_mask: torch.Tensor, maps: AttentionMaps | None = None
    ) -> torch.Tensor:
        """src [B, S], src_pad_mask [B, S] (True at padding) -> memory [B, S, D]."""
        return self.encoder(src, key_padding_mask(src_pad_mask), maps)

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        src_pad_mask: torch.Tensor,
        maps: AttentionMaps | None = None,
    ) -> torch.Tensor:
        """tgt_in [B, T] -> logits [B, T, V] for every position (teacher forcing)."""
        return self.output_proj(self.decoder(tgt_in, memory, key_padding_mask(src_pad_mask), maps))

    def init_cache(
        self, memory: torch.Tensor, src_pad_mask: torch.Tensor, max_len: int = 0
    ) -> DecoderCache:
        """Cross-attention K/V of every decoder layer, computed once per sentence; one decoder row
        per sentence until ``cache.expand(beam)``. max_len: decoder positions to make room for up
        front, as growing the buffer copies it; more are still possible."""
        cross_kv = torch.stack(
            [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]
        )
        return DecoderCache(cross_kv, attend_mask(src_pad_mask), max_len)

    def decode_step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens [B * beam] (BOS first) -> next-token logits [B * beam, V]; appends to the cache."""
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
