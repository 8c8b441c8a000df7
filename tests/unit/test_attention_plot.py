from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tests.pictures import png_size
from torch.nn.utils.rnn import pad_sequence

from nmt.attention_maps import BOS, EOS, sentence_attention
from nmt.attention_plot import plot_attention
from nmt.checkpoint import load_for_inference
from nmt.cli import run
from nmt.config import DecodeConfig, load_config
from nmt.decoding import greedy_search
from nmt.tokenizer import EOS_ID, PAD_ID
from nmt.train import train
from nmt.translate import translate_lines

pytest.importorskip("matplotlib")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# a sentence of the synthetic test corpus's grammar (tests/synthetic_corpus.py) and its translation
SOURCE = "A man carries the blue shirt on the bridge."
REFERENCE = "Ein Mann tragt das blaue Hemd auf der Brücke."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_corpus) -> Path:
    run_dir = tmp_path_factory.mktemp("attn") / "run"
    cfg = load_config(CONFIGS / "tiny.yaml", [f"run_dir={run_dir}", f"data.dir={small_corpus}",
                                              "train.max_steps=10", "train.valid_every=0",
                                              "data.max_valid_sentences=4", "train.keep_last=0",
                                              "model.encoder_layers=1", "model.decoder_layers=1"])
    train(cfg, log=lambda _m: None)
    return run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_for_inference(checkpoint)


def _rows_are_distributions(weights: torch.Tensor) -> None:
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
    assert bool((weights >= 0).all())


@pytest.mark.slow
def test_greedy_target_maps_have_labelled_shapes_and_respect_causality(loaded):
    model, tokenizer, cfg = loaded
    att = sentence_attention(model, tokenizer, SOURCE, decode=cfg.decode)
    heads, layers = cfg.model.heads, cfg.model.encoder_layers
    assert att.source == [*tokenizer.src_pieces(SOURCE), EOS]
    assert att.decoder_in[0] == BOS and att.decoder_out[-1] == EOS
    assert att.decoder_in[1:] == att.decoder_out[:-1]
    s, t = len(att.source), len(att.decoder_in)
    assert len(att.maps["encoder"]) == layers and len(att.maps["cross"]) == cfg.model.decoder_layers
    for w in att.maps["encoder"]:
        assert w.shape == (heads, s, s)
        _rows_are_distributions(w)
    for w in att.maps["decoder_self"]:
        assert w.shape == (heads, t, t)
        _rows_are_distributions(w)
        assert bool((w.triu(1) == 0).all()), "a decoder position attends to a later one"
    for w in att.maps["cross"]:
        assert w.shape == (heads, t, s)
        _rows_are_distributions(w)
    # the picture shows the translation `nmt translate --greedy` gives
    greedy = DecodeConfig(**{**cfg.decode.__dict__, "beam": 1})
    assert att.target == next(translate_lines(model, tokenizer, [SOURCE], greedy, search="greedy"))


@pytest.mark.slow
def test_reference_target_uses_its_subword_pieces(loaded):
    model, tokenizer, _ = loaded
    att = sentence_attention(model, tokenizer, SOURCE, REFERENCE)
    assert att.decoder_out == [*tokenizer.tgt_pieces(REFERENCE), EOS]
    assert att.target == REFERENCE
    assert att.maps["cross"][0].shape[1:] == (len(att.decoder_out), len(att.source))


@pytest.mark.slow
def test_padding_keys_get_no_attention_in_a_batch(loaded):
    model, tokenizer, _ = loaded
    ids = tokenizer.encode_src([SOURCE, "A dog."])
    src = pad_sequence([torch.tensor([*i, EOS_ID]) for i in ids], batch_first=True, padding_value=PAD_ID)
    tgt_in = torch.tensor([[2, 10, 11, 12], [2, 13, 0, 0]])
    maps = model.attention_maps(src, tgt_in)
    short = len(ids[1]) + 1
    for kind in ("encoder", "cross"):
        for w in maps[kind]:
            _rows_are_distributions(w)
            assert bool((w[1, ..., short:] == 0).all()), f"{kind} attends to source padding"
    for w in maps["decoder_self"]:
        assert bool((w.triu(1) == 0).all())


@pytest.mark.slow
def test_asking_for_attention_does_not_change_the_translation(loaded):
    model, tokenizer, _ = loaded
    src = torch.tensor([[*tokenizer.encode_src([SOURCE])[0], EOS_ID]])
    mask = src.eq(PAD_ID)
    before = greedy_search(model, src, mask)[0]
    model.train()  # attention_maps runs in eval mode and restores the mode it found
    maps = model.attention_maps(src, torch.tensor([[2, *before.tokens]]))
    assert model.training
    model.eval()
    after = greedy_search(model, src, mask)[0]
    assert after.tokens == before.tokens and after.score == pytest.approx(before.score, abs=1e-6)
    # the explicit-softmax path scores the greedy tokens as the SDPA path does
    memory = model.encode(src, mask)
    logits = model.decode(torch.tensor([[2, *before.tokens]]), memory, mask)
    explicit = model.decode(torch.tensor([[2, *before.tokens]]), model.encode(src, mask, {"encoder": []}),
                            mask, {"decoder_self": [], "cross": []})
    assert torch.allclose(logits, explicit, atol=1e-5)
    assert len(maps["cross"]) == len(model.decoder.layers)


@pytest.mark.slow
def test_plot_attention_writes_a_grid_per_layer_and_a_mean_per_kind(loaded, tmp_path):
    model, tokenizer, cfg = loaded
    paths = plot_attention(sentence_attention(model, tokenizer, "Two dogs run."), tmp_path)
    names = sorted(p.name for p in paths)
    expected = sorted([f"{k}_layer{i}.png" for k in ("encoder_self", "decoder_self", "cross")
                       for i in (1,)] + ["encoder_self_mean.png", "decoder_self_mean.png", "cross_mean.png"])
    assert names == expected
    for p in paths:
        png_size(p)


@pytest.mark.slow
def test_cli_attention_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert run(["attention", "-m", str(checkpoint), "--src", "  ", "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: the source sentence is empty\n"
    assert run(["attention", "-m", str(tmp_path / "missing.pt"), "--src", SOURCE]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_fails_before_loading_the_model(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    assert run(["attention", "-m", str(tmp_path / "not-even-there.pt"), "--src", SOURCE]) == 2
    assert capsys.readouterr().err == "error: plotting needs the matplotlib package: pip install 'nmt[plot]'\n"
