"""Greedy, beam and sampling search, written once against the model's incremental-decoding interface.

The model only needs ``encode(src, src_pad_mask)``, ``init_cache(memory, src_pad_mask, max_len)``
(one row per sentence; room for max_len decoder positions), ``cache.expand(beam)`` (beam consecutive
rows per sentence, copies of its row), ``decode_step(tokens[B * beam], cache) -> logits[B * beam,
V]`` and ``cache.reorder(index, same_sources)``. The caller puts the model in eval mode. Lengths
count generated tokens without BOS/EOS; a sentence may produce at most ``int(max_len_a * src_len +
max_len_b)`` tokens (``src_len`` = real source tokens incl. EOS, capped so the decoder input stays
within the model's ``max_positions``), then EOS is forced. EOS is blocked while fewer than
``min_len`` tokens exist; PAD and BOS are never generated. Sentences that are done leave the batch
(``cache.reorder`` with a smaller index), so they stop costing compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nmt.errors import NMTError
from nmt.special import BOS_ID, EOS_ID, PAD_ID

NEG_INF = float("-inf")
_BLOCK = 64  # vocabulary block of the two-level top-k


@dataclass
class Hypothesis:
    """One output sentence: token ids without BOS/EOS, its score and per-token log-probs (incl. EOS)."""

    tokens: list[int]
    score: float
    positional_scores: list[float] = field(default_factory=list)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha; ``length`` counts the EOS token too."""
    return ((5.0 + length) / 6.0) ** alpha


def model_max_positions(model: object) -> int | None:
    """The model's positional limit (its ``max_positions``), or None if it has none."""
    return getattr(model, "max_positions", None)


def max_lengths(src_pad_mask: Tensor, max_len_a: float, max_len_b: int, cap: int | None) -> Tensor:
    """Per-sentence output length limits [B] (long): int(a * src_len + b), clamped to [0, cap]."""
    src_len = (~src_pad_mask).sum(dim=1).double()
    limits = (max_len_a * src_len + max_len_b).floor().long().clamp(min=0)
    return limits if cap is None else limits.clamp(max=max(cap, 0))


# ---------------------------------------------------------------------------------------------
# shared per-step scoring


def top_tokens(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best values of each row of scores [R, V] and their token ids, both [R, k], best first.

    Equal to ``scores.topk(k, dim=1)`` but for the order of tied values. It reads the whole row once
    for the maxima of blocks of 64 tokens; the k best tokens lie in the k blocks with the best maxima
    (or in the ragged tail), and only those go through the top-k, which is costlier per value than
    a maximum: it reads k * 64 values per row (and the tail) instead of all of them.
    """
    rows, vocab = scores.shape
    full = vocab // _BLOCK  # whole blocks
    if full <= k:
        return scores.topk(k, dim=1)
    blocks = scores[:, : full * _BLOCK].view(rows, full, _BLOCK)
    best = blocks.amax(dim=2).topk(k, dim=1).indices  # [R, k] blocks
    within = torch.arange(_BLOCK, device=scores.device)
    values = blocks.gather(1, best[:, :, None].expand(-1, -1, _BLOCK)).flatten(1)  # [R, k * BLOCK]
    ids = (best[:, :, None] * _BLOCK + within).flatten(1)  # [R, k * BLOCK]
    if full * _BLOCK < vocab:
        tail = torch.arange(full * _BLOCK, vocab, device=scores.device)
        values = torch.cat([values, scores[:, full * _BLOCK:]], dim=1)
        ids = torch.cat([ids, tail.expand(rows, -1)], dim=1)
    top, pos = values.topk(k, dim=1)
    return top, ids.gather(1, pos)


def best_tokens(scores: Tensor) -> Tensor:
    """Argmax of each row of scores [R, V] -> [R] (``top_tokens`` with k = 1)."""
    return top_tokens(scores, 1)[1][:, 0]


def _mask_lprobs(lprobs: Tensor, tokens: Tensor, step: int, min_len: int, row_max_lens: Tensor,
                 no_repeat_ngram: int) -> Tensor:
    """Apply the search constraints in place to log-probs [R, V] of rows whose prefixes are tokens [R, step]."""
    eos_raw = lprobs[:, EOS_ID].clone()
    lprobs[:, PAD_ID] = NEG_INF
    lprobs[:, BOS_ID] = NEG_INF
    if step < min_len:
        lprobs[:, EOS_ID] = NEG_INF
    if 0 < no_repeat_ngram <= step:
        _block_repeats(lprobs, tokens, no_repeat_ngram)
    # At the length limit only EOS remains, with its unconstrained log-prob (wins over min_len).
    at_max = step >= row_max_lens  # [R]
    if bool(at_max.any()):  # skips a [R, V] pass on most steps
        lprobs.masked_fill_(at_max[:, None], NEG_INF)
        lprobs[:, EOS_ID] = torch.where(at_max, eos_raw, lprobs[:, EOS_ID])
    return lprobs


def _block_repeats(lprobs: Tensor, tokens: Tensor, n: int) -> None:
    """Forbid tokens that would complete an n-gram already present in the row's prefix."""
    windows = tokens.unfold(1, n, 1)  # [R, W, n]: every n-gram generated so far
    recent = tokens[:, tokens.size(1) - n + 1:]  # [R, n-1]: the prefix of the n-gram being built
    hit = (windows[:, :, :-1] == recent[:, None, :]).all(dim=-1)  # [R, W]
    # Non-matching windows point at PAD, which is -inf already, so scattering there is harmless.
    banned = windows[:, :, -1].masked_fill(~hit, PAD_ID)
    lprobs.scatter_(1, banned, NEG_INF)


def _next_lprobs(model, cache, tokens: Tensor, step: int, min_len: int, row_max_lens: Tensor,
                 no_repeat_ngram: int, first: Tensor | None = None) -> Tensor:
    """Constrained next-token log-probs [R, V] (float32) for prefixes tokens [R, step]; the first
    step reads ``first`` [R] (default BOS)."""
    if step > 0:
        last = tokens[:, -1]
    elif first is not None:
        last = first
    else:
        last = torch.full((tokens.size(0),), BOS_ID, dtype=torch.long, device=tokens.device)
    logits = model.decode_step(last, cache)
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    return _mask_lprobs(lprobs, tokens, step, min_len, row_max_lens, no_repeat_ngram)


def _check_inputs(src: Tensor, src_pad_mask: Tensor, min_len: int, no_repeat_ngram: int) -> None:
    if src.dim() != 2 or src_pad_mask.shape != src.shape:
        raise NMTError(f"src must be [B, S] with a mask of the same shape, got {tuple(src.shape)} "
                       f"and {tuple(src_pad_mask.shape)}")
    if min_len < 0 or no_repeat_ngram < 0:
        raise NMTError("min_len and no_repeat_ngram must be >= 0")


# ---------------------------------------------------------------------------------------------
# greedy and sampling: one hypothesis per sentence


def _incremental_search(model, src: Tensor, src_pad_mask: Tensor, max_len_a: float, max_len_b: int,
                        min_len: int, no_repeat_ngram: int,
                        choose: Callable[[Tensor], Tensor]) -> list[Hypothesis]:
    """Extend every sentence by ``choose(lprobs[R, V]) -> tokens[R]`` until EOS or its length limit."""
    _check_inputs(src, src_pad_mask, min_len, no_repeat_ngram)
    if src.size(0) == 0:
        return []
    limits = max_lengths(src_pad_mask, max_len_a, max_len_b, _cap(model))
    memory = model.encode(src, src_pad_mask)
    cache = model.init_cache(memory, src_pad_mask, int(limits.max()) + 1)
    return _extend(model, cache, limits, min_len, no_repeat_ngram, choose)


def _extend(model, cache, limits: Tensor, min_len: int, no_repeat_ngram: int,
            choose: Callable[[Tensor], Tensor], first: Tensor | None = None) -> list[Hypothesis]:
    """The step loop of ``_incremental_search`` over the rows of ``cache`` (limits [R]), from the
    token ``first`` [R] (default BOS)."""
    rows, device = limits.size(0), limits.device
    alive = torch.arange(rows, device=device)  # original sentence index of each row
    tokens = torch.empty(rows, 0, dtype=torch.long, device=device)  # [R, step]
    pos_scores = torch.empty(rows, 0, device=device)  # [R, step]
    results: list[Hypothesis | None] = [None] * rows
    for step in range(int(limits.max()) + 1):
        lprobs = _next_lprobs(model, cache, tokens, step, min_len, limits, no_repeat_ngram, first)
        choice = choose(lprobs)  # [R]
        chosen = lprobs.gather(1, choice[:, None])  # [R, 1]
        tokens = torch.cat([tokens, choice[:, None]], dim=1)
        pos_scores = torch.cat([pos_scores, chosen], dim=1)
        done = (choice == EOS_ID) | (step >= limits) | ~torch.isfinite(chosen.squeeze(1))
        if not bool(done.any()):
            continue
        # The last token is EOS (or, if every token was impossible, a placeholder): drop it.
        for sent, toks, ps in zip(alive[done].tolist(), tokens[done, :-1].tolist(),
                                  pos_scores[done].tolist(), strict=True):
            results[sent] = Hypothesis(toks, float(sum(ps)), ps)
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        cache.reorder(keep)
        alive, limits, tokens, pos_scores = alive[keep], limits[keep], tokens[keep], pos_scores[keep]
    return [h if h is not None else Hypothesis([], NEG_INF, []) for h in results]


def _cap(model) -> int | None:
    """Longest output (tokens without EOS) for which BOS y1..yn fits in the decoder's positions."""
    positions = model_max_positions(model)
    return None if positions is None else positions - 1


@torch.inference_mode()
def greedy_search(model, src: Tensor, src_pad_mask: Tensor, max_len_a: float = 1.5,
                  max_len_b: int = 10, min_len: int = 1, no_repeat_ngram: int = 0) -> list[Hypothesis]:
    """Most probable next token at every step; score = sum of log-probs (incl. EOS)."""
    return _incremental_search(model, src, src_pad_mask, max_len_a, max_len_b, min_len,
                               no_repeat_ngram, best_tokens)


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Keep the top_k best tokens (0 = all), then the smallest set whose probability reaches top_p."""
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop = before >= top_p
        drop[:, 0] = False  # the best token always stays
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, NEG_INF))
    return logits


def _sampler(temperature: float, top_k: int, top_p: float,
             generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    def choose(lprobs: Tensor) -> Tensor:
        if temperature == 0.0:
            return best_tokens(lprobs)
        logits = _filter_logits(lprobs / temperature, top_k, top_p)
        # A row with every token impossible ends with EOS instead of crashing multinomial.
        dead = ~torch.isfinite(logits).any(dim=-1)
        logits[:, EOS_ID] = torch.where(dead, 0.0, logits[:, EOS_ID])
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return choose


@torch.inference_mode()
def sample_search(model, src: Tensor, src_pad_mask: Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, max_len_a: float = 1.5, max_len_b: int = 10, min_len: int = 1,
                  generator: torch.Generator | None = None,
                  no_repeat_ngram: int = 0) -> list[Hypothesis]:
    """Ancestral sampling from softmax(logits / temperature) restricted by top_k / top_p.

    temperature 0 means greedy. Scores are the model's own (temperature 1, unfiltered) log-probs.
    Same generator seed, same batch -> same output.
    """
    if temperature < 0.0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise NMTError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                       f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    return _incremental_search(model, src, src_pad_mask, max_len_a, max_len_b, min_len,
                               no_repeat_ngram, _sampler(temperature, top_k, top_p, generator))


@torch.inference_mode()
def sample_continuations(model, prompt: Tensor, max_len: int, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, min_len: int = 0,
                         generator: torch.Generator | None = None) -> list[Hypothesis]:
    """``sample_search`` continuing sequences instead of translating: the model reads prompt
    [B, P] (no padding) in one pass (``model.prompt_cache``), then the same step loop samples up
    to ``max_len`` tokens per row from its last token on. Hypotheses hold the new tokens only."""
    if temperature < 0.0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise NMTError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                       f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if prompt.dim() != 2 or prompt.size(1) < 2:
        raise NMTError(f"prompt must be [B, P] with P >= 2, got {tuple(prompt.shape)}")
    cache = model.prompt_cache(prompt[:, :-1], max_len + 1)
    limits = torch.full((prompt.size(0),), max_len, dtype=torch.long, device=prompt.device)
    return _extend(model, cache, limits, min_len, 0, _sampler(temperature, top_k, top_p, generator),
                   first=prompt[:, -1])


# ---------------------------------------------------------------------------------------------
# beam search


@dataclass
class _BeamState:
    """Active hypotheses: ``beam`` rows per unfinished sentence, R = sentences * beam."""

    beam: int
    tokens: Tensor  # [R, step] generated tokens (no BOS)
    pos_scores: Tensor  # [R, step] log-prob of each generated token
    scores: Tensor  # [R] cumulative log-probs
    sent_ids: Tensor  # [bsz] original index of each active sentence
    max_lens: Tensor  # [bsz] output length limits
    n_finished: Tensor  # [bsz] finished hypotheses collected (<= beam)

    @classmethod
    def start(cls, beam: int, max_lens: Tensor) -> _BeamState:
        bsz, device = max_lens.size(0), max_lens.device
        # Only the first row of each sentence is live at step 0: the others would duplicate it.
        scores = torch.full((bsz, beam), NEG_INF, device=device)
        scores[:, 0] = 0.0
        return cls(beam, torch.empty(bsz * beam, 0, dtype=torch.long, device=device),
                   torch.empty(bsz * beam, 0, device=device), scores.view(-1),
                   torch.arange(bsz, device=device), max_lens, torch.zeros_like(max_lens))

    def row_max_lens(self) -> Tensor:
        return self.max_lens.repeat_interleave(self.beam)  # [R]


@dataclass
class _Candidates:
    """The 2 * beam best one-token extensions of each sentence, best first; all [bsz, 2 * beam]."""

    scores: Tensor  # cumulative log-probs
    rows: Tensor  # row (of the current state) each candidate extends
    tokens: Tensor
    lprobs: Tensor  # log-prob of the candidate token itself


def _beam_step(model, cache, st: _BeamState, step: int, min_len: int,
               no_repeat_ngram: int) -> tuple[Tensor, Tensor]:
    """Each row's best k = 2 * beam constrained next tokens [R, k] and their log-probs [R, k].

    A sentence's 2 * beam best extensions are among these. Adding the beam scores to all [R, V]
    log-probs before a top-k over [bsz, beam * V] cost as much as reading them twice more.
    At step 0 every hypothesis is BOS: the cache still has one row per sentence, whose result
    stands for all ``beam`` rows (its copies have -inf scores until then).
    """
    first = step == 0
    prefixes = st.tokens[:: st.beam] if first else st.tokens  # [bsz or R, step]
    limits = st.max_lens if first else st.row_max_lens()
    lprobs = _next_lprobs(model, cache, prefixes, step, min_len, limits, no_repeat_ngram)
    top, tokens = top_tokens(lprobs, min(2 * st.beam, lprobs.size(1)))
    if first:
        top, tokens = top.repeat_interleave(st.beam, dim=0), tokens.repeat_interleave(st.beam, dim=0)
    return tokens, top


def _prune(st: _BeamState, tokens: Tensor, lprobs: Tensor, finished: list[list[Hypothesis]],
           lenpen: float) -> tuple[_Candidates, Tensor]:
    """Pick 2 * beam candidates per sentence from each row's best tokens / lprobs [R, k], route EOS
    ones to ``finished``; return the candidates and the beam to keep.

    Returns the candidates and active [bsz, beam]: positions of the best ``beam`` non-EOS candidates.
    There are at least ``beam`` of them since each row contributes at most one EOS candidate.
    """
    beam, k = st.beam, tokens.size(1)
    bsz = tokens.size(0) // beam
    totals = (st.scores[:, None] + lprobs).view(bsz, beam * k)  # cumulative log-probs
    top_scores, flat = totals.topk(2 * beam, dim=1)  # [bsz, 2*beam]
    rows = flat // k + torch.arange(bsz, device=flat.device)[:, None] * beam
    pick = (rows, flat % k)
    cand = _Candidates(top_scores, rows, tokens[pick], lprobs[pick])
    is_eos = cand.tokens == EOS_ID
    # Only EOS candidates that would have made the beam finish; impossible ones (-inf) never do.
    ends = is_eos[:, :beam] & torch.isfinite(top_scores[:, :beam])
    _collect_finished(st, cand, ends, finished, lenpen)
    st.n_finished = (st.n_finished + ends.sum(dim=1)).clamp(max=beam)
    rank = torch.arange(2 * beam, device=flat.device) + is_eos * (2 * beam)  # EOS sorts last
    active = rank.topk(beam, dim=1, largest=False).indices  # [bsz, beam], still best first
    return cand, active


def _collect_finished(st: _BeamState, cand: _Candidates, ends: Tensor,
                      finished: list[list[Hypothesis]], lenpen: float) -> None:
    """Append EOS candidates (ends [bsz, beam]) to their sentence's list, at most ``beam`` per sentence."""
    if not bool(ends.any()):
        return
    rows = cand.rows[:, :ends.size(1)][ends]  # [F], sentence-major then rank order
    sents = st.sent_ids[:, None].expand_as(ends)[ends].tolist()
    tokens = st.tokens[rows].tolist()
    pos = torch.cat([st.pos_scores[rows], cand.lprobs[:, :ends.size(1)][ends][:, None]], 1).tolist()
    scores = cand.scores[:, :ends.size(1)][ends].tolist()
    for sent, toks, ps, total in zip(sents, tokens, pos, scores, strict=True):
        if len(finished[sent]) < st.beam:
            finished[sent].append(Hypothesis(toks, total / length_penalty(len(toks) + 1, lenpen), ps))


def _advance(st: _BeamState, cand: _Candidates, active: Tensor, keep: Tensor) -> Tensor | None:
    """Move the kept sentences' active candidates into the state; return the cache reorder index."""
    if not bool(keep.any()):
        return None

    def pick(values: Tensor) -> Tensor:  # [bsz, 2*beam] -> [bsz' * beam]
        return values.gather(1, active)[keep].reshape(-1)

    rows = pick(cand.rows)  # indexes the current rows, which is what the cache holds
    st.tokens = torch.cat([st.tokens[rows], pick(cand.tokens)[:, None]], dim=1)
    st.pos_scores = torch.cat([st.pos_scores[rows], pick(cand.lprobs)[:, None]], dim=1)
    st.scores = pick(cand.scores)
    st.sent_ids, st.max_lens, st.n_finished = st.sent_ids[keep], st.max_lens[keep], st.n_finished[keep]
    return rows


def _finalize(finished: list[list[Hypothesis]], nbest: int) -> list[list[Hypothesis]]:
    """Best ``nbest`` distinct hypotheses per sentence, by length-penalised score."""
    out = []
    for hyps in finished:
        seen: set[tuple[int, ...]] = set()
        best = []
        for h in sorted(hyps, key=lambda h: h.score, reverse=True):
            if tuple(h.tokens) not in seen:
                seen.add(tuple(h.tokens))
                best.append(h)
        out.append(best[:nbest] or [Hypothesis([], NEG_INF, [])])
    return out


@torch.inference_mode()
def beam_search(model, src: Tensor, src_pad_mask: Tensor, beam: int = 5, lenpen: float = 1.0,
                max_len_a: float = 1.5, max_len_b: int = 10, min_len: int = 1, nbest: int = 1,
                no_repeat_ngram: int = 0) -> list[list[Hypothesis]]:
    """Batched beam search; ``nbest`` hypotheses per sentence, best first.

    Stopping follows fairseq: a sentence is done once it holds ``beam`` finished hypotheses (EOS
    candidates ranked inside the beam), or at its length limit where EOS is forced. Beams are pruned
    by raw log-prob; the GNMT length penalty (``lenpen`` = alpha) only ranks finished hypotheses.
    Fewer than ``nbest`` come back only when fewer distinct finite hypotheses exist.
    """
    if beam < 1 or not 1 <= nbest <= beam:
        raise NMTError(f"beam must be >= 1 and nbest between 1 and beam; got beam={beam}, nbest={nbest}")
    _check_inputs(src, src_pad_mask, min_len, no_repeat_ngram)
    bsz = src.size(0)
    if bsz == 0:
        return []
    st = _BeamState.start(beam, max_lengths(src_pad_mask, max_len_a, max_len_b, _cap(model)))
    memory = model.encode(src, src_pad_mask)
    cache = model.init_cache(memory, src_pad_mask, int(st.max_lens.max()) + 1)
    finished: list[list[Hypothesis]] = [[] for _ in range(bsz)]
    for step in range(int(st.max_lens.max()) + 1):
        tokens, lprobs = _beam_step(model, cache, st, step, min_len, no_repeat_ngram)
        cand, active = _prune(st, tokens, lprobs, finished, lenpen)
        keep = (st.n_finished < beam) & (step < st.max_lens)
        all_kept = bool(keep.all())
        index = _advance(st, cand, active, keep)
        if index is None:
            break
        if step == 0:
            cache.expand(beam)
        cache.reorder(index, same_sources=all_kept)
    return _finalize(finished, nbest)
