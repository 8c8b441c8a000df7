"""nmt.generate: samples of a language model continue the prompt, the same seed gives the same samples."""

from __future__ import annotations

import pytest
import torch
from tests.unit.prepare_helpers import Log, make_cfg

from nmt import generate as generate_module
from nmt.config import ModelConfig
from nmt.data.prepare import prepare_data
from nmt.decoding import sample_continuations
from nmt.errors import NMTError
from nmt.generate import generate
from nmt.model import build_model
from nmt.special import BOS_ID, EOS_ID
from nmt.translate import SamplingOptions


@pytest.fixture
def lm(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    cfg.task, cfg.data.lang = "lm", "de"
    tokenizer = prepare_data(cfg, log=Log()).tokenizer
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="decoder_only", decoder_layers=1, d_model=16, heads=2, d_ff=32,
                                    max_positions=24), tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    return model, tokenizer


def test_same_seed_same_samples_and_the_prompt_starts_each(lm):
    model, tokenizer = lm
    first = generate(model, tokenizer, "the dog", 4, 8, 24, SamplingOptions(seed=3))
    assert first == generate(model, tokenizer, "the dog", 4, 8, 24, SamplingOptions(seed=3))
    assert first != generate(model, tokenizer, "the dog", 4, 8, 24, SamplingOptions(seed=4))
    assert len(first) == 4 and len(set(first)) > 1 and all(s.startswith("the dog") for s in first)
    assert model.training  # left as it was found


def test_an_empty_prompt_samples_from_scratch_at_least_one_piece(lm):
    model, tokenizer = lm
    samples = generate(model, tokenizer, "", 5, 3, 24, SamplingOptions(seed=1))
    assert len(samples) == 5 and all(samples)
    greedy = generate(model, tokenizer, " ", 2, 3, 24, SamplingOptions(temperature=0.0))
    assert greedy[0] == greedy[1]


@pytest.fixture
def calls(monkeypatch) -> list:
    """(prompt row, max_len, lengths of the continuations) of each sample_continuations call."""
    seen = []

    def recording(model, prompt, max_len, *args, **kwargs):
        hyps = sample_continuations(model, prompt, max_len, *args, **kwargs)
        seen.append((prompt[0].tolist(), max_len, [len(h.tokens) for h in hyps]))
        return hyps

    monkeypatch.setattr(generate_module, "sample_continuations", recording)
    return seen


def test_length_is_bounded_by_max_len_and_the_positions(lm, calls):
    model, tokenizer = lm
    ids = tokenizer.encode_tgt(["the dog"])[0]
    generate(model, tokenizer, "the dog", 3, 1, 24, SamplingOptions(temperature=2.0))
    # </s> <s> and the prompt leave 24 - 2 - len(ids) positions whatever --max-len says
    generate(model, tokenizer, "the dog", 3, 500, 24, SamplingOptions(temperature=2.0))
    assert calls[0][0] == [EOS_ID, BOS_ID, *ids]
    assert [c[1] for c in calls] == [1, 24 - 2 - len(ids)]
    assert max(calls[0][2]) <= 1 and max(calls[1][2]) <= 24 - 2 - len(ids)
    with pytest.raises(NMTError, match="this model reads at most 21"):
        generate(model, tokenizer, "the dog " * 20, 1, 5, 24, SamplingOptions())
    with pytest.raises(NMTError, match="--num and --max-len must be >= 1"):
        generate(model, tokenizer, "a", 0, 5, 24, SamplingOptions())


def test_a_model_that_would_end_at_once_still_gives_one_piece_from_scratch(lm, calls):
    model, tokenizer = lm
    step = model.decode_step

    def eager_to_end(tokens, cache):
        return step(tokens, cache).index_fill(1, torch.tensor([EOS_ID]), 100.0)

    model.decode_step = eager_to_end
    generate(model, tokenizer, "", 3, 5, 24, SamplingOptions())
    assert generate(model, tokenizer, "the dog", 2, 5, 24, SamplingOptions()) == ["the dog"] * 2
    assert [c[2] for c in calls] == [[1, 1, 1], [0, 0]]


def test_samples_under_bf16_autocast(lm):
    model, tokenizer = lm
    samples = generate(model, tokenizer, "the dog", 2, 4, 24, SamplingOptions(seed=2), precision="bf16")
    assert len(samples) == 2 and all(s.startswith("the dog") for s in samples)
