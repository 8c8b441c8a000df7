from __future__ import annotations

import pytest
import torch

from nmt.config import ModelConfig
from nmt.decoding import (
    beam_search,
    greedy_search,
    model_max_positions,
    sample_continuations,
    sample_search,
)
from nmt.errors import NMTError
from nmt.loss import Objective
from nmt.model import DecoderOnlyTransformer, build_model
from nmt.special import BOS_ID, EOS_ID, PAD_ID

VOCAB = 23
ATOL = 1e-5
PATTERNS = ["causal", "bidirectional"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(source_attention: str = "causal", seed: int = 0, **overrides) -> DecoderOnlyTransformer:
    base = dict(arch="decoder_only", source_attention=source_attention, decoder_layers=2, d_model=32,
                heads=4, d_ff=64, dropout=0.0, attention_dropout=0.0, max_positions=64)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**base, **overrides}), VOCAB, VOCAB).eval()
    assert isinstance(model, DecoderOnlyTransformer)
    return model


def padded_src(gen: torch.Generator, lengths: list[int]) -> torch.Tensor:
    """[B, max(lengths)]: random real tokens ending in EOS, right-padded with PAD_ID."""
    src = torch.randint(4, VOCAB, (len(lengths), max(lengths)), generator=gen)
    for row, n in enumerate(lengths):
        src[row, n - 1] = EOS_ID
        src[row, n:] = PAD_ID
    return src


def target_prefix(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    tgt = torch.randint(4, VOCAB, (rows, cols), generator=gen)
    tgt[:, 0] = BOS_ID
    return tgt


def states(model, src, tgt) -> torch.Tensor:
    with torch.no_grad():
        return model.sequence_states(src, src.eq(PAD_ID), tgt)


def changed(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    """Per position of [1, L, D] states: whether they differ."""
    return [not torch.allclose(x, y, atol=ATOL, rtol=0) for x, y in zip(a[0], b[0], strict=True)]


@pytest.mark.parametrize("norm_first", [False, True])
def test_causal_pattern_hides_every_later_token(norm_first):
    model = tiny_model("causal", norm_first=norm_first)
    gen = torch.Generator().manual_seed(1)
    src, tgt = padded_src(gen, [6]), target_prefix(gen, 1, 4)
    base = states(model, src, tgt)
    other_src = src.clone()
    other_src[0, 3] = 4 if src[0, 3] != 4 else 5
    assert changed(base, states(model, other_src, tgt)) == [False] * 3 + [True] * 7
    other_tgt = tgt.clone()
    other_tgt[0, 2] = 4 if tgt[0, 2] != 4 else 5
    assert changed(base, states(model, src, other_tgt)) == [False] * 8 + [True] * 2


@pytest.mark.parametrize("norm_first", [False, True])
def test_prefix_pattern_source_sees_itself_but_not_the_target(norm_first):
    model = tiny_model("bidirectional", norm_first=norm_first)
    gen = torch.Generator().manual_seed(1)
    src, tgt = padded_src(gen, [6]), target_prefix(gen, 1, 4)
    base = states(model, src, tgt)
    other_src = src.clone()
    other_src[0, 3] = 4 if src[0, 3] != 4 else 5
    assert changed(base, states(model, other_src, tgt)) == [True] * 10  # earlier source positions too
    other_tgt = tgt.clone()
    other_tgt[0, 2] = 4 if tgt[0, 2] != 4 else 5
    assert changed(base, states(model, src, other_tgt)) == [False] * 8 + [True] * 2


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_sentence_reads_the_same_alone_and_in_a_padded_batch(pattern):
    """The padding between a short source and its target is neither attended nor counted as positions."""
    model = tiny_model(pattern)
    gen = torch.Generator().manual_seed(2)
    src, tgt = padded_src(gen, [3, 9, 5]), target_prefix(gen, 3, 6)
    with torch.no_grad():
        batched = model(src, tgt)
        for row, n in enumerate([3, 9, 5]):
            alone = model(src[row:row + 1, :n], tgt[row:row + 1])
            torch.testing.assert_close(alone[0], batched[row], atol=ATOL, rtol=0)


def _check_steps(model, cache, src, tgt, start):
    """decode_step over tgt[:, start:] equals teacher-forced decoding of (src, tgt) there."""
    pad_mask = src.eq(PAD_ID)
    full = model.decode(tgt, model.encode(src, pad_mask), pad_mask)
    for t in range(start, tgt.size(1)):
        torch.testing.assert_close(model.decode_step(tgt[:, t], cache), full[:, t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("norm_first", [False, True])
@torch.no_grad()
def test_incremental_decoding_equals_full_decoding_through_beam_reorders(nan_filled_new_empty, pattern, norm_first):
    model = tiny_model(pattern, norm_first=norm_first)
    gen = torch.Generator().manual_seed(7)
    src, tgt = padded_src(gen, [5, 7, 2]), target_prefix(gen, 3, 2)
    pad_mask = src.eq(PAD_ID)
    cache = model.init_cache(model.encode(src, pad_mask), pad_mask)
    _check_steps(model, cache, src, tgt, 0)  # one row per sentence
    cache.expand(2)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    src, tgt = src[rows], torch.cat([tgt[rows], torch.randint(4, VOCAB, (6, 1), generator=gen)], dim=1)
    _check_steps(model, cache, src, tgt, 2)
    index = torch.tensor([1, 1, 3, 2, 4, 5])  # hypotheses swapped and duplicated within sentences
    cache.reorder(index, same_sources=True)
    tgt = torch.cat([tgt[index], torch.randint(4, VOCAB, (6, 4), generator=gen)], dim=1)
    _check_steps(model, cache, src, tgt, 3)
    index = torch.tensor([5, 4, 0, 0])  # sentence 1 finished; sentences 2 and 0 swap places
    cache.reorder(index)
    src, tgt = src[index], torch.cat([tgt[index], torch.randint(4, VOCAB, (4, 12), generator=gen)], dim=1)
    _check_steps(model, cache, src, tgt, 7)  # the buffer grows past its first 16 positions
    assert cache.length == src.size(1) + tgt.size(1)


def test_target_states_project_to_the_full_logits_there():
    model = tiny_model("bidirectional")
    gen = torch.Generator().manual_seed(8)
    src, tgt = padded_src(gen, [6, 3, 5]), target_prefix(gen, 3, 7)
    tgt[1, 4:] = PAD_ID
    positions = tgt.flatten().ne(PAD_ID).nonzero().squeeze(1)
    with torch.no_grad():
        full, picked = model(src, tgt), model.output_proj(model.target_states(src, tgt, positions))
    torch.testing.assert_close(picked, full.flatten(0, 1)[positions], atol=ATOL, rtol=0)


def sources(gen: torch.Generator, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    src = padded_src(gen, lengths)
    return src, src.eq(PAD_ID)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_beam_one_equals_greedy_and_beam_batches_like_single_sentences(pattern):
    model = tiny_model(pattern)
    gen = torch.Generator().manual_seed(3)
    src, mask = sources(gen, [4, 8, 2, 6])
    kw = {"max_len_a": 1.0, "max_len_b": 3, "min_len": 2}
    greedy = greedy_search(model, src, mask, **kw)
    beam1 = beam_search(model, src, mask, beam=1, lenpen=0.0, **kw)
    assert [h.tokens for h in greedy] == [n[0].tokens for n in beam1]
    assert [h.score for h in greedy] == pytest.approx([n[0].score for n in beam1], abs=1e-4)
    assert [h.tokens for h in greedy] == [h.tokens for h in sample_search(model, src, mask, temperature=0.0, **kw)]
    batched = beam_search(model, src, mask, beam=3, nbest=2, **kw)
    for row, n in enumerate([4, 8, 2, 6]):
        single = beam_search(model, src[row:row + 1, :n], mask[row:row + 1, :n], beam=3, nbest=2, **kw)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[row]]
        # each hypothesis scored by the cache as by teacher forcing
        for h in batched[row]:
            tgt_in = torch.tensor([[BOS_ID, *h.tokens]])
            with torch.no_grad():
                lprobs = model(src[row:row + 1, :n], tgt_in).log_softmax(-1)[0]
            forced = lprobs.gather(1, torch.tensor([*h.tokens, EOS_ID])[:, None]).squeeze(1)
            assert h.positional_scores == pytest.approx(forced.tolist(), abs=1e-4)


def test_source_and_output_each_get_half_the_positions():
    model = tiny_model(max_positions=20)
    assert model_max_positions(model) == 10
    gen = torch.Generator().manual_seed(4)
    src, mask = sources(gen, [10, 3])  # the longest source translate lets through
    for h in greedy_search(model, src, mask, max_len_a=0.0, max_len_b=100, min_len=100):
        assert len(h.tokens) == 9  # BOS + 9 tokens: 10 target positions, 20 in all
    with pytest.raises(NMTError, match="exceeds model.max_positions"):
        model(padded_src(gen, [15]), target_prefix(gen, 1, 6))


def test_overfits_one_batch_through_the_training_objective():
    """Trained through ``Objective`` as the trainer does; then greedy decoding gives the targets back."""
    model = tiny_model("bidirectional").train()
    gen = torch.Generator().manual_seed(5)
    src, targets = padded_src(gen, [6, 4, 5, 3]), padded_src(gen, [5, 6, 3, 4])  # each ends with EOS
    tgt_in = torch.cat([torch.full((4, 1), BOS_ID), targets[:, :-1]], dim=1)
    tgt_in[tgt_in.eq(EOS_ID)] = PAD_ID
    positions = targets.flatten().ne(PAD_ID).nonzero().squeeze(1)
    objective = Objective(model, 0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss, nll = objective(src, tgt_in, positions, targets.flatten()[positions])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if nll.item() / positions.numel() < 0.02:
            break
    assert nll.item() / positions.numel() < 0.02
    model.eval()
    hyps = greedy_search(model, src, src.eq(PAD_ID), max_len_a=0.0, max_len_b=8)
    expected = [[t for t in row if t not in (PAD_ID, EOS_ID)] for row in targets.tolist()]
    assert [h.tokens for h in hyps] == expected


def test_one_vocabulary_is_required():
    with pytest.raises(NMTError, match="tokenizer.joint=true"):
        build_model(ModelConfig(arch="decoder_only", d_model=32, heads=4, d_ff=64), VOCAB, VOCAB + 1)


def test_attention_maps_are_refused_in_one_line():
    model = tiny_model()
    with pytest.raises(NMTError, match="model.arch=encoder_decoder"):
        model.attention_maps(torch.tensor([[5, EOS_ID]]), torch.tensor([[BOS_ID]]))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bf16_autocast_trains_and_decodes_with_a_bf16_cache(pattern):
    model = tiny_model(pattern).train()
    gen = torch.Generator().manual_seed(6)
    src, tgt = padded_src(gen, [5, 8, 3]), target_prefix(gen, 3, 6)
    positions = torch.arange(tgt.numel())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = Objective(model, 0.1)(src, tgt, positions, tgt.flatten())
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.eval()
        with torch.no_grad():
            cache = model.init_cache(src, src.eq(PAD_ID))
        assert cache.self_kv.dtype == torch.bfloat16  # the dtype the projections give the keys
        hyps = greedy_search(model, src, src.eq(PAD_ID), max_len_a=0.0, max_len_b=5)
    assert all(torch.isfinite(torch.tensor(h.score)) for h in hyps)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_continuing_a_prompt_equals_teacher_forcing_the_whole_sequence(nan_filled_new_empty, pattern):
    """A language model's prompt ``</s> <s> a b`` is read causally in one pass whatever the source
    pattern (its target part was trained causally); the sampled continuation's scores are the full
    forward pass's log-probs of the same tokens."""
    model = tiny_model(pattern, max_positions=40)
    prompt = torch.tensor([[EOS_ID, BOS_ID, 7, 9, 11]] * 3)
    gen = torch.Generator().manual_seed(5)
    hyps = sample_continuations(model, prompt, max_len=6, temperature=1.5, generator=gen)
    for hyp in hyps:
        assert len(hyp.tokens) <= 6 and len(hyp.positional_scores) == len(hyp.tokens) + 1  # EOS scored too
        tgt_in = torch.tensor([[BOS_ID, 7, 9, 11, *hyp.tokens]])
        with torch.no_grad():
            lprobs = torch.log_softmax(model(prompt[:1, :1], tgt_in)[0], dim=-1)  # [T, V]
        full = [lprobs[3 + i, tok].item() for i, tok in enumerate([*hyp.tokens, EOS_ID])]
        assert hyp.positional_scores == pytest.approx(full, abs=1e-4)
    again = sample_continuations(model, prompt, max_len=6, temperature=1.5, generator=torch.Generator().manual_seed(5))
    assert [h.tokens for h in again] == [h.tokens for h in hyps]
    with pytest.raises(NMTError, match="P >= 2"):
        sample_continuations(model, prompt[:, :1], max_len=3)
