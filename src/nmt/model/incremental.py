"""The incremental-decoding cache: keys and values of the positions decoded so far, one step at a time.

Search decodes B sentences with ``beam`` consecutive rows each (R = B * beam rows, one row until
``expand``). The attention modules hand the cache the projected heads of the new position
(``attend_self``, ``attend_memory``); the cache stores them in its beam layout and attends over it
through the same ``scaled_dot_product_attention`` as full decoding.

Beam layout: the rows of one sentence are attended together, as one row of ``beam`` queries, so the
source K/V are read once per sentence rather than once per hypothesis, and the self-attention
history is stored per sentence with one slot per hypothesis at each position. Beam search moving
a hypothesis to another row moves an index into these slots, not the K/V.
"""

from __future__ import annotations

import torch

from nmt.model.cpu_kernels import scaled_dot_product_attention


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> float mask, 0 to attend and -inf not. Decoding builds one per
    step and reuses it over layers, where a bool mask would cost a negation and a masked copy of
    the scores in every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _group(heads: torch.Tensor, beam: int) -> torch.Tensor:
    """[R, H, 1, dk] (one query per row) -> [B, H, beam, dk] (a sentence's rows as one row); a view."""
    return heads.squeeze(2).unflatten(0, (-1, beam)).transpose(1, 2)


def _ungroup(heads: torch.Tensor) -> torch.Tensor:
    """[B, H, beam, dk] -> [R, H, 1, dk], the inverse of ``_group``."""
    sentences, h, beam, d_k = heads.shape
    return heads.transpose(1, 2).reshape(sentences * beam, h, 1, d_k)


class DecoderCache:
    """Decoder state for incremental decoding of B sentences with ``beam`` consecutive rows each.

    self_kv: [L, 2, B, H, capacity, beam, dk]: at each position, one slot per row of the sentence,
    filled up to ``length``; the capacity doubles when full, so a step never copies the history.
    slots: [B * beam, capacity] (long): for each row and position, the slot holding the row's own
    history there. Attention reads all slots of a sentence once and masks those off the row's
    history (instead of copying the history of every row at every step).
    cross_kv: [L, 2, B, H, S, dk], the source K/V, computed once per sentence and shared by its
    rows; mem_mask [B, 1, 1, S] additive over them. Both None for a decoder without a source.
    prefix_pad: [B, P] (True at padding) over a prefix of P positions written in one pass
    (``start_prefix``, ``store_prefix``): a decoder-only model's padded source. Its padded
    positions are never attended, and the positions after it are numbered without them
    (``position_shift``). None when there is no prefix or nothing in it is padded.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        max_len: int = 0,
        cross_kv: torch.Tensor | None = None,
        mem_mask: torch.Tensor | None = None,
        prefix_pad: torch.Tensor | None = None,
    ) -> None:
        """shape: (layers, sentences, heads, d_k); mem_mask: bool [B, 1, 1, S] (True = attend);
        prefix_pad: bool [B, P] (True at padding)."""
        self.shape, self.dtype = shape, dtype
        self._empty = torch.empty(0, dtype=dtype, device=device)  # new buffers: self._empty.new_empty
        self.cross_kv = cross_kv
        self.mem_mask = None if mem_mask is None else additive_mask(mem_mask, dtype)
        padded = prefix_pad is not None and bool(prefix_pad.any())  # one host sync per batch
        self.prefix_pad = prefix_pad if padded else None
        self.beam = 1
        self.self_kv: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.length = 0
        self._history: torch.Tensor | None = None  # the current step's mask over self_kv
        if max_len > 0:
            self.reserve(max_len)

    # -- a prefix in one pass ----------------------------------------------------------------------

    def start_prefix(self, length: int) -> None:
        """Make room for positions 0..length-1, which ``store_prefix`` fills layer by layer; the
        caller attends over them itself (it has all their queries at once), then calls
        ``finish_step(length)``."""
        assert self.length == 0 and self.beam == 1, "a prefix goes into an empty one-row cache"
        self.reserve(length)
        assert self.slots is not None
        self.slots[:, :length] = 0  # one row per sentence: slot 0 (expand copies it to every slot)

    def store_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [B, H, P, dk] of positions 0..P-1 -> stored as ``layer``'s history."""
        assert self.self_kv is not None
        kv = self.self_kv[layer]  # [2, B, H, capacity, 1, dk]
        kv[0, :, :, : k.size(2), 0] = k
        kv[1, :, :, : v.size(2), 0] = v

    def position_shift(self) -> torch.Tensor | None:
        """Long [R]: how much lower each row's position is than ``length`` (the padding in its
        sentence's prefix), or None when every row is at ``length``."""
        if self.prefix_pad is None:
            return None
        return self.prefix_pad.sum(dim=1).repeat_interleave(self.beam)

    # -- one decoding step -------------------------------------------------------------------------

    def start_step(self) -> None:
        """Make room for position ``length`` and build the history mask all layers share."""
        self.reserve(self.length + 1)
        self._history = self.history_mask()

    def attend_self(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q/k/v [R, H, 1, dk] of position ``length`` -> attention output [R, H, 1, dk] over each
        row's history (this position included); k/v are stored."""
        assert self.self_kv is not None
        kv, pos = self.self_kv[layer], self.length  # [2, B, H, capacity, beam, dk]
        kv[0, :, :, pos] = _group(k, self.beam)
        kv[1, :, :, pos] = _group(v, self.beam)
        # [B, H, pos+1, beam, dk] -> [B, H, (pos+1)*beam, dk]: every slot of every past position, a view
        keys, values = kv[:, :, :, : pos + 1].flatten(3, 4)
        q = _group(q, self.beam)
        return _ungroup(scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), self._history))

    def attend_memory(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [R, H, 1, dk] -> attention output [R, H, 1, dk] over the row's source."""
        assert self.cross_kv is not None
        keys, values = self.cross_kv[layer]  # [B, H, S, dk] each
        q = _group(q, self.beam)
        return _ungroup(scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), self.mem_mask))

    def finish_step(self, positions: int = 1) -> None:
        self.length += positions
        self._history = None

    # -- memory layout -----------------------------------------------------------------------------

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in the self-attention buffer."""
        if self.self_kv is not None and self.self_kv.size(4) >= length:
            return
        old = self.self_kv.size(4) if self.self_kv is not None else 0
        capacity = max(16, length, 2 * old)
        layers, sentences, heads, d_k = self.shape
        kv = self._empty.new_empty(layers, 2, sentences, heads, capacity, self.beam, d_k)
        slots = torch.empty(sentences * self.beam, capacity, dtype=torch.long, device=self._empty.device)
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
        0..length (the one being decoded included), position-major; None when beam == 1 and no
        prefix is padded."""
        assert self.slots is not None
        rows, pos = self.slots.size(0), self.length
        self.slots[:, pos] = torch.arange(rows, device=self.slots.device) % self.beam  # own slot
        real = self._real_positions(pos + 1)  # [B, pos + 1] or None
        if self.beam == 1:
            return None if real is None else additive_mask(real[:, None, None, :], self.dtype)
        own = self.slots[:, : pos + 1].view(-1, self.beam, pos + 1, 1)  # [B, beam, T, 1]
        every = torch.arange(self.beam, device=own.device)  # slots of the sentence at a position
        mine = (own == every).view(-1, 1, self.beam, (pos + 1) * self.beam)
        if real is not None:  # every slot of a padded position is masked
            mine = mine & real.repeat_interleave(self.beam, dim=1)[:, None, None, :]
        return additive_mask(mine, self.dtype)

    def _real_positions(self, length: int) -> torch.Tensor | None:
        """Bool [B, length], False at the prefix's padding; None when nothing is padded."""
        if self.prefix_pad is None:
            return None
        after = self.prefix_pad.new_zeros(self.prefix_pad.size(0), length - self.prefix_pad.size(1))
        return ~torch.cat([self.prefix_pad, after], dim=1)

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        """Keep rows ``index`` (Long [R']) in place; rows may repeat, be dropped or permuted.

        With beam > 1, rows move in whole sentences: the ``beam`` rows of each new sentence come
        from one old sentence (as when beam search drops finished sentences).
        same_sources: every row of ``index`` reads the same source sentence as the row it replaces
        (beam search reordering hypotheses within their sentences): no K/V moves then.
        """
        if not same_sources:
            sources = index.view(-1, self.beam)[:, 0] // self.beam  # [B'] sentence of each group
            layers, _, heads, d_k = self.shape
            self.shape = (layers, sources.numel(), heads, d_k)
            if self.cross_kv is not None and self.mem_mask is not None:
                self.cross_kv = self.cross_kv.index_select(2, sources)
                self.mem_mask = self.mem_mask.index_select(0, sources)
            if self.self_kv is not None:
                self.self_kv = self.self_kv.index_select(2, sources)
            if self.prefix_pad is not None:
                self.prefix_pad = self.prefix_pad.index_select(0, sources)
        if self.slots is not None:
            self.slots = self.slots.index_select(0, index)
