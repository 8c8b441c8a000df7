"""Greedy, beam and sampling search against fake models with known next-token distributions."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch
from torch import nn

from nmt.decoding import (
    Hypothesis,
    beam_search,
    greedy_search,
    length_penalty,
    max_lengths,
    model_max_positions,
    sample_search,
    top_tokens,
)
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID

A, B, C, D, EOS = 4, 5, 6, 7, EOS_ID  # ordinary tokens; 0-3 are PAD, UNK, BOS, EOS


pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 8
Table = Callable[[tuple[int, ...], tuple[int, ...]], dict[int, float]]


class FakeCache:
    """Per-row (source, prefix) state; records the batch sizes it is reordered to."""

    def __init__(self, sources: list[tuple[int, ...]], log: list[int]) -> None:
        self.sources = sources
        self.prefixes: list[tuple[int, ...]] = [() for _ in sources]
        self.length = 0
        self.log = log

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        rows = index.tolist()
        if same_sources:  # the promise that lets the real cache skip re-gathering cross-attention K/V
            assert [self.sources[i] for i in rows] == self.sources
        self.sources = [self.sources[i] for i in rows]
        self.prefixes = [self.prefixes[i] for i in rows]
        self.log.append(len(rows))

    def expand(self, beam: int) -> None:
        assert self.length == 1  # beam search expands after its first step
        self.sources = [s for s in self.sources for _ in range(beam)]
        self.prefixes = [p for p in self.prefixes for _ in range(beam)]


class FakeModel(nn.Module):
    """Next-token probabilities table(source tokens, generated prefix) -> {token: prob}."""

    def __init__(self, table: Table, vocab: int = VOCAB, max_positions: int | None = None) -> None:
        super().__init__()
        self.table = table
        self.vocab = vocab
        if max_positions is not None:
            self.max_positions = max_positions
        self.reorders: list[int] = []
        self.step_sizes: list[int] = []

    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> torch.Tensor:
        return src.float()[:, :, None]  # [B, S, 1]

    def init_cache(self, memory: torch.Tensor, src_pad_mask: torch.Tensor,
                   max_len: int = 0) -> FakeCache:
        sources = [tuple(int(t) for t, pad in zip(row, m, strict=True) if not pad)
                   for row, m in zip(memory[:, :, 0].tolist(), src_pad_mask.tolist(), strict=True)]
        return FakeCache(sources, self.reorders)

    def decode_step(self, tokens: torch.Tensor, cache: FakeCache) -> torch.Tensor:
        self.step_sizes.append(tokens.size(0))
        if cache.length == 0:
            assert bool((tokens == BOS_ID).all())
        else:
            cache.prefixes = [p + (t,) for p, t in zip(cache.prefixes, tokens.tolist(), strict=True)]
        cache.length += 1
        logits = torch.full((tokens.size(0), self.vocab), float("-inf"))
        for row, (source, prefix) in enumerate(zip(cache.sources, cache.prefixes, strict=True)):
            for token, prob in self.table(source, prefix).items():
                logits[row, token] = math.log(prob) if prob > 0 else float("-inf")
        return logits


def batch(*sources: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded src [B, S] (each ending with EOS) and its pad mask."""
    width = max(len(s) for s in sources) + 1
    src = torch.full((len(sources), width), PAD_ID, dtype=torch.long)
    for i, s in enumerate(sources):
        src[i, : len(s) + 1] = torch.tensor([*s, EOS_ID])
    return src, src == PAD_ID


# Greedy takes a (.5) then c (.45) then EOS: p = .225. Beam finds b EOS: p = .4 * .9 = .36.
DISAGREE = {(): {A: .5, B: .4, EOS: .1}, (A,): {C: .45, D: .3, EOS: .25}, (B,): {EOS: .9, C: .1},
            (A, C): {EOS: 1.0}, (A, D): {EOS: .6, C: .4}}


def disagree_table(source: tuple[int, ...], prefix: tuple[int, ...]) -> dict[int, float]:
    return DISAGREE.get(prefix, {EOS: 1.0})


def random_table(source: tuple[int, ...], prefix: tuple[int, ...]) -> dict[int, float]:
    """Deterministic pseudo-random distribution per (source, prefix); EOS likelier as prefixes grow."""
    rng = random.Random(repr((source, prefix)))
    weights = {t: rng.random() + 0.05 for t in (1, A, B, C, D)}
    weights[EOS] = rng.random() * len(prefix) / 3
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def run_beam(model, *sources, **kw) -> list[list[Hypothesis]]:
    src, mask = batch(*sources)
    args = {"beam": 2, "lenpen": 0.0, "max_len_a": 0.0, "max_len_b": 10, "min_len": 1, "nbest": 1,
            "no_repeat_ngram": 0}
    return beam_search(model, src, mask, **{**args, **kw})


def run_greedy(model, *sources, **kw) -> list[Hypothesis]:
    src, mask = batch(*sources)
    args = {"max_len_a": 0.0, "max_len_b": 10, "min_len": 1}
    return greedy_search(model, src, mask, **{**args, **kw})


def test_greedy_exact_hypothesis_and_score():
    [hyp] = run_greedy(FakeModel(disagree_table), [A])
    assert hyp.tokens == [A, C]
    assert hyp.score == pytest.approx(math.log(.5 * .45 * 1.0), abs=1e-5)
    assert hyp.positional_scores == pytest.approx([math.log(.5), math.log(.45), 0.0], abs=1e-5)


def test_beam_exact_hypotheses_without_length_penalty():
    [nbest] = run_beam(FakeModel(disagree_table), [A], beam=2, nbest=2)
    assert [h.tokens for h in nbest] == [[B], [A, C]]
    assert [h.score for h in nbest] == pytest.approx([math.log(.36), math.log(.225)], abs=1e-5)
    assert nbest[0].positional_scores == pytest.approx([math.log(.4), math.log(.9)], abs=1e-5)


def test_beam_length_penalty_reranks_finished_hypotheses():
    alpha = 3.0
    [nbest] = run_beam(FakeModel(disagree_table), [A], beam=2, nbest=2, lenpen=alpha)
    expected = {(B,): math.log(.36) / ((5 + 2) / 6) ** alpha,
                (A, C): math.log(.225) / ((5 + 3) / 6) ** alpha}
    assert [h.tokens for h in nbest] == [[A, C], [B]]  # the longer one wins once penalised
    assert [h.score for h in nbest] == pytest.approx([expected[(A, C)], expected[(B,)]], abs=1e-5)


def test_length_penalty_formula():
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    assert length_penalty(3, 0.0) == 1.0


def test_nbest_sorted_and_distinct():
    model = FakeModel(random_table)
    for nbest in run_beam(model, [A, B], [C], [D, D, A, B], beam=5, nbest=5, lenpen=0.6):
        scores = [h.score for h in nbest]
        assert len(nbest) == 5
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in nbest}) == len(nbest)


def always(probs: dict[int, float]) -> Table:
    return lambda source, prefix: probs


def test_min_len_blocks_eos():
    model = FakeModel(always({EOS: .9, A: .1}))
    assert run_greedy(model, [A], min_len=0)[0].tokens == []
    assert run_greedy(model, [A], min_len=3)[0].tokens == [A, A, A]
    for h in run_beam(model, [A], beam=3, nbest=3, min_len=3)[0]:
        assert len(h.tokens) >= 3


def test_max_length_per_sentence_and_forced_eos():
    model = FakeModel(always({A: .6, B: .39, EOS: .01}))
    sources = ([A], [A, B, C])  # src_len incl. EOS: 2 and 4 -> limits 1 * len + 2 = 4 and 6
    for nbest, limit in zip(run_beam(model, *sources, beam=3, nbest=3, max_len_a=1.0, max_len_b=2),
                            (4, 6), strict=True):
        assert [len(h.tokens) for h in nbest] == [limit] * 3
        assert nbest[0].positional_scores[-1] == pytest.approx(math.log(.01), abs=1e-5)
    greedy = run_greedy(model, *sources, max_len_a=1.0, max_len_b=2)
    assert [h.tokens for h in greedy] == [[A] * 4, [A] * 6]


def test_max_lengths_counts_real_tokens_and_caps():
    src, mask = batch([A], [A, B, C])
    assert max_lengths(mask, 1.5, 1, None).tolist() == [4, 7]
    assert max_lengths(mask, 1.5, 1, 5).tolist() == [4, 5]


def test_output_capped_by_model_max_positions():
    model = FakeModel(always({A: .99, EOS: .01}), max_positions=5)
    assert model_max_positions(model) == 5
    assert run_greedy(model, [A], max_len_b=50)[0].tokens == [A] * 4  # BOS + 4 tokens = 5 positions
    assert all(len(h.tokens) <= 4 for h in run_beam(model, [A], max_len_b=50, nbest=2)[0])


def test_no_repeat_ngram():
    model = FakeModel(always({A: .7, B: .2, EOS: .1}))
    assert run_greedy(model, [A], max_len_b=6)[0].tokens == [A] * 6
    assert run_greedy(model, [A], no_repeat_ngram=1)[0].tokens == [A, B]
    # a a, then "a a" is taken -> b, then "b a" is new, then both "a a" and "a b" are taken -> EOS
    assert run_greedy(model, [A], no_repeat_ngram=2)[0].tokens == [A, A, B, A]
    for h in run_beam(model, [A], beam=4, nbest=4, no_repeat_ngram=2)[0]:
        bigrams = list(zip(h.tokens, h.tokens[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))


def test_beam_one_equals_greedy_on_fake_model():
    model = FakeModel(random_table)
    sources = ([A, B], [C], [D, D, A, B, C], [B, B])
    greedy = run_greedy(model, *sources, min_len=2)
    beam = run_beam(model, *sources, beam=1, min_len=2)
    assert [h.tokens for h in greedy] == [n[0].tokens for n in beam]
    assert [h.score for h in greedy] == pytest.approx([n[0].score for n in beam], abs=1e-5)


def test_batched_beam_equals_one_sentence_at_a_time():
    model = FakeModel(random_table)
    sources = ([A, B], [C], [D, D, A, B, C, C], [B, B], [A])
    kw = {"beam": 4, "nbest": 3, "lenpen": 1.0, "max_len_a": 1.0, "max_len_b": 1}
    batched = run_beam(model, *sources, **kw)
    single = [run_beam(model, s, **kw)[0] for s in sources]
    assert [[h.tokens for h in n] for n in batched] == [[h.tokens for h in n] for n in single]
    assert [[h.score for h in n] for n in batched] == [[pytest.approx(h.score, abs=1e-5) for h in n]
                                                       for n in single]


def test_finished_sentences_leave_the_batch():
    model = FakeModel(always({A: .6, B: .39, EOS: .01}))
    sources = ([A], [A, B, C], [A, B, C, D, A])  # limits (a=1, b=0): 2, 4, 6
    run_beam(model, *sources, beam=2, max_len_a=1.0, max_len_b=0)
    assert model.step_sizes == [3, 6, 6, 4, 4, 2, 2]  # the first step decodes once per sentence
    assert model.reorders == [6, 6, 4, 4, 2, 2]  # beam rows come from expand, not a reorder
    model.step_sizes.clear()
    run_greedy(model, *sources, max_len_a=1.0, max_len_b=0)
    assert model.step_sizes == [3, 3, 3, 2, 2, 1, 1]


@pytest.mark.parametrize("vocab", [8000, 8001, 8063, 100, 12])
@pytest.mark.parametrize("k", [1, 10])
def test_top_tokens_equals_topk(vocab, k):
    gen = torch.Generator().manual_seed(vocab + k)
    scores = torch.randn(37, vocab, generator=gen)
    scores[:, PAD_ID] = scores[:, BOS_ID] = float("-inf")
    scores[5, :-1] = float("-inf")  # only the last token is finite (in the ragged tail, if any)
    scores[6, -3:] = 100.0 + torch.arange(3.0)  # the best three are the last tokens
    k = min(k, vocab)
    values, ids = top_tokens(scores, k)
    expected = scores.topk(k, dim=1).values
    assert torch.equal(values, expected)
    assert torch.equal(scores.gather(1, ids), values)
    assert ids[5, 0] == vocab - 1
    assert ids[6, :3].tolist() == [vocab - 1, vocab - 2, vocab - 3][:k]


def run_sample(model, *sources, seed=0, **kw) -> list[Hypothesis]:
    src, mask = batch(*sources)
    gen = torch.Generator().manual_seed(seed)
    args = {"max_len_a": 0.0, "max_len_b": 10, "min_len": 1}
    return sample_search(model, src, mask, generator=gen, **{**args, **kw})


def test_sampling_is_seeded():
    model = FakeModel(random_table)
    sources = [[A, B]] * 8
    first = [h.tokens for h in run_sample(model, *sources, seed=3)]
    assert first == [h.tokens for h in run_sample(model, *sources, seed=3)]
    assert len({tuple(t) for t in first}) > 1  # rows really are sampled
    assert first != [h.tokens for h in run_sample(model, *sources, seed=4)]


def test_sampling_degenerates_to_greedy():
    model = FakeModel(random_table)
    sources = ([A, B], [C], [D, D, A])
    greedy = [h.tokens for h in run_greedy(model, *sources)]
    assert [h.tokens for h in run_sample(model, *sources, top_k=1)] == greedy
    assert [h.tokens for h in run_sample(model, *sources, temperature=1e-4)] == greedy
    assert [h.tokens for h in run_sample(model, *sources, temperature=0.0)] == greedy


def test_top_p_keeps_only_the_nucleus():
    model = FakeModel(always({A: .5, B: .3, C: .12, D: .05, EOS: .03}))
    sources = [[A]] * 40
    seen = {t for h in run_sample(model, *sources, top_p=0.7, max_len_b=8) for t in h.tokens}
    assert seen == {A, B}  # A (.5) + B (.3) reach .7; C, D and EOS lie outside the nucleus
    seen_all = {t for h in run_sample(model, *sources, top_p=1.0, max_len_b=8) for t in h.tokens}
    assert {C, D} <= seen_all


def test_sample_scores_are_model_log_probs():
    [hyp] = run_sample(FakeModel(disagree_table), [A], top_k=1)
    assert hyp.tokens == [A, C]
    assert hyp.score == pytest.approx(math.log(.225), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# a tiny real torch model (GRU decoder with masked attention over the source), random weights


class TinyCache:
    def __init__(self, memory: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor) -> None:
        self.memory, self.mask, self.hidden, self.length = memory, mask, hidden, 0

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        self.memory, self.mask, self.hidden = self.memory[index], self.mask[index], self.hidden[index]

    def expand(self, beam: int) -> None:
        self.reorder(torch.arange(self.memory.size(0)).repeat_interleave(beam))


class TinyModel(nn.Module):
    def __init__(self, vocab: int = 12, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.cell = nn.GRUCell(dim, dim)
        self.out = nn.Linear(2 * dim, vocab)

    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed(src))  # [B, S, D]

    def init_cache(self, memory: torch.Tensor, src_pad_mask: torch.Tensor,
                   max_len: int = 0) -> TinyCache:
        keep = (~src_pad_mask).float()[:, :, None]
        hidden = (memory * keep).sum(1) / keep.sum(1)  # [B, D] mean of real positions
        return TinyCache(memory, src_pad_mask, hidden)

    def decode_step(self, tokens: torch.Tensor, cache: TinyCache) -> torch.Tensor:
        cache.hidden = self.cell(self.embed(tokens), cache.hidden)
        att = (cache.memory @ cache.hidden[:, :, None]).squeeze(2)  # [B, S]
        att = att.masked_fill(cache.mask, float("-inf")).softmax(-1)
        context = (att[:, :, None] * cache.memory).sum(1)  # [B, D]
        cache.length += 1
        return 3 * self.out(torch.cat([cache.hidden, context], -1))


def tiny_sources(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 12) for _ in range(rng.randrange(1, 9))] for _ in range(n)]


def test_tiny_model_beam_one_equals_greedy_and_batch_invariance():
    torch.manual_seed(0)
    model = TinyModel().eval()
    sources = tiny_sources(6, seed=1)
    kw = {"max_len_a": 1.0, "max_len_b": 3}
    greedy = run_greedy(model, *sources, **kw)
    beam1 = run_beam(model, *sources, beam=1, **kw)
    assert [h.tokens for h in greedy] == [n[0].tokens for n in beam1]
    batched = run_beam(model, *sources, beam=3, nbest=2, lenpen=1.0, **kw)
    single = [run_beam(model, s, beam=3, nbest=2, lenpen=1.0, **kw)[0] for s in sources]
    assert [[h.tokens for h in n] for n in batched] == [[h.tokens for h in n] for n in single]
    assert any(len(n[0].tokens) > 0 for n in batched)


def teacher_forced(model, source: list[int], tokens: list[int]) -> list[float]:
    """Log-probs of tokens + EOS after BOS under full (non-incremental) decoding."""
    src, mask = batch(source)
    tgt_in = torch.tensor([[BOS_ID, *tokens]])
    with torch.no_grad():
        lprobs = model.decode(tgt_in, model.encode(src, mask), mask).log_softmax(-1)[0]
    return lprobs.gather(1, torch.tensor([*tokens, EOS])[:, None]).squeeze(1).tolist()


def test_transformer_integration_beam_one_greedy_batching_and_position_cap():
    from nmt.config import ModelConfig
    from nmt.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=32, heads=4, d_ff=64,
                      max_positions=10)
    model = build_model(cfg, 24, 24).eval()
    assert model_max_positions(model) == 10
    sources = [[t + 8 for t in s] for s in tiny_sources(5, seed=2)]
    kw = {"max_len_a": 1.0, "max_len_b": 2, "min_len": 2}
    greedy = run_greedy(model, *sources, **kw)
    beam1 = run_beam(model, *sources, beam=1, **kw)
    assert [h.tokens for h in greedy] == [n[0].tokens for n in beam1]
    assert [h.score for h in greedy] == pytest.approx([n[0].score for n in beam1], abs=1e-4)
    batched = run_beam(model, *sources, beam=4, nbest=2, lenpen=1.0, **kw)
    single = [run_beam(model, s, beam=4, nbest=2, lenpen=1.0, **kw)[0] for s in sources]
    assert [[h.tokens for h in n] for n in batched] == [[h.tokens for h in n] for n in single]
    # each hypothesis scored by incremental decoding as by teacher forcing: every row attended to
    # its own history although beam search moved hypotheses between rows
    for source, nbest in zip(sources, batched, strict=True):
        for h in nbest:
            assert h.positional_scores == pytest.approx(teacher_forced(model, source, h.tokens),
                                                        abs=1e-4)
    # an output limit beyond the positional table is capped instead of crashing
    for h in run_greedy(model, *sources, max_len_a=0.0, max_len_b=100, min_len=100):
        assert len(h.tokens) == 9
