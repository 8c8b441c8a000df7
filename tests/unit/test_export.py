"""Export to transformers and CTranslate2: the exported models compute our function.

Randomly initialised models (post-norm and pre-norm): their teacher-forced logits must agree, and
their greedy outputs differ from sentence to sentence (a model trained for a few steps says the same
thing for every input), so equal token ids mean something.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from nmt.checkpoint import load_for_inference, save_checkpoint
from nmt.config import Config, DataConfig, DecodeConfig, ModelConfig, TokenizerConfig, to_dict
from nmt.decoding import greedy_search
from nmt.errors import NMTError
from nmt.model import build_model
from nmt.tokenizer import EOS_ID, PAD_ID, Tokenizer
from nmt.translate import translate_lines

transformers = pytest.importorskip("transformers", reason="export tests need transformers (nmt[export])")

MODEL = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=32, heads=4, d_ff=64, dropout=0.0,
                    attention_dropout=0.0, max_positions=128)
DECODE = DecodeConfig(beam=1, max_len_a=1.2, max_len_b=4)


@pytest.fixture(scope="module")
def sentences(small_corpus) -> list[str]:
    return (small_corpus / "val.en").read_text(encoding="utf-8").splitlines()[:40]


@pytest.fixture(scope="module")
def tokenizer(small_corpus) -> Tokenizer:
    en = (small_corpus / "train.en").read_text(encoding="utf-8").splitlines()
    de = (small_corpus / "train.de").read_text(encoding="utf-8").splitlines()
    return Tokenizer.train(en, de, TokenizerConfig(vocab_size=200))


@pytest.fixture(scope="module", params=[False, True], ids=["post_norm", "pre_norm"])
def checkpoint(request, tokenizer, tmp_path_factory):
    """A random-init model saved as a checkpoint (what `nmt train` writes, less training state)."""
    torch.manual_seed(3)
    cfg = Config(model=replace(MODEL, norm_first=request.param), data=DataConfig(max_len=100), decode=DECODE)
    model = build_model(cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    path = tmp_path_factory.mktemp("export") / "model.pt"
    save_checkpoint({"config": to_dict(cfg), "tokenizer": tokenizer.to_state(),
                     "model": model.state_dict(), "step": 0}, path)
    return path


def _batch(tokenizer, lines):
    ids = [[*s, EOS_ID] for s in tokenizer.encode_src(lines)]
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in ids], batch_first=True,
                                          padding_value=PAD_ID)
    return src, src == PAD_ID


def test_transformers_model_has_our_logits_and_greedy_ids(checkpoint, sentences, one_torch_thread):
    from nmt.export import build_hf_model

    model, tokenizer, cfg = load_for_inference(checkpoint)
    hf = build_hf_model(model, tokenizer, cfg)
    assert type(hf).__name__ == ("PegasusForConditionalGeneration" if cfg.model.norm_first
                                 else "MarianMTModel")
    # the positional table is the one transformers builds itself: no hidden change of function
    for stack in (hf.model.encoder, hf.model.decoder):
        table = stack.embed_positions
        torch.testing.assert_close(table.weight, table.create_weight(), atol=1e-6, rtol=0)
    src, pad = _batch(tokenizer, sentences)
    ours = greedy_search(model, src, pad, DECODE.max_len_a, DECODE.max_len_b, DECODE.min_len)
    # teacher-forced logits on our own greedy outputs
    tgt = torch.nn.utils.rnn.pad_sequence([torch.tensor([2, *h.tokens]) for h in ours],
                                          batch_first=True, padding_value=PAD_ID)
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=~pad, decoder_input_ids=tgt).logits
        mine = model.decode(tgt, model.encode(src, pad), pad)
    torch.testing.assert_close(theirs, mine, atol=2e-4, rtol=1e-4)
    limit = int(DECODE.max_len_a * src.size(1) + DECODE.max_len_b)
    out = hf.generate(input_ids=src, attention_mask=~pad, num_beams=1, do_sample=False,
                      max_new_tokens=limit + 1)
    lengths = (~pad).sum(1).tolist()
    for row, hyp, length in zip(out[:, 1:].tolist(), ours, lengths, strict=True):
        row = row[: row.index(EOS_ID)] if EOS_ID in row else row
        # our limit forces EOS after int(a * src_len + b) tokens: greedy's prefix up to there
        assert row[: int(DECODE.max_len_a * length + DECODE.max_len_b)] == hyp.tokens
    assert len({tuple(h.tokens) for h in ours}) > 20, "outputs that ignore the input prove little"


def test_export_folder_loads_offline_with_our_tokenizer(checkpoint, sentences, tmp_path, one_torch_thread):
    from nmt.export import export_transformers

    out = export_transformers(checkpoint, tmp_path / "hf")
    model, tokenizer, _ = load_for_inference(checkpoint)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out)
    assert hf.config.model_type == ("pegasus" if model.encoder.final_norm.__class__.__name__ == "LayerNorm"
                                    else "marian")
    enc = hf_tok(sentences[:8], return_tensors="pt", padding=True)
    ours = [[*ids, EOS_ID] for ids in tokenizer.encode_src(sentences[:8])]
    assert [row[: len(o)] for row, o in zip(enc["input_ids"].tolist(), ours, strict=True)] == ours
    generated = hf.generate(**enc, num_beams=1, max_new_tokens=12)
    texts = hf_tok.batch_decode(generated, skip_special_tokens=True)
    expected = list(translate_lines(model, tokenizer, sentences[:8],
                                    replace(DECODE, max_len_a=0.0, max_len_b=12), search="beam"))
    assert texts == expected


def test_ctranslate2_float32_equals_our_greedy(checkpoint, sentences, tmp_path, one_torch_thread):
    pytest.importorskip("ctranslate2", reason="needs ctranslate2 (nmt[export])")
    from nmt.ct2_engine import CT2Translator
    from nmt.export import export_ctranslate2

    out = export_ctranslate2(checkpoint, tmp_path / "ct2")
    model, tokenizer, _ = load_for_inference(checkpoint)
    ours = list(translate_lines(model, tokenizer, sentences, DECODE, search="beam"))
    theirs = list(CT2Translator(out, threads=1).translate(sentences))
    assert theirs == ours
    assert len(set(ours)) > 20


def test_untied_model_is_refused():
    from nmt.export import build_hf_model

    cfg = Config(model=replace(MODEL, tie_embeddings=False))
    model = build_model(cfg.model, 50, 50)
    with pytest.raises(NMTError, match="tie_embeddings"):
        build_hf_model(model, SimpleNamespace(joint=False, tgt_vocab_size=50), cfg)


def test_permutation_puts_sines_first():
    from nmt.export import residual_permutation
    from nmt.model.embeddings import sinusoidal_table

    table = sinusoidal_table(7, 8)[:, residual_permutation(8)]
    assert torch.equal(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_exported_beam_search_stops_as_ours_and_has_our_length_penalty(checkpoint):
    """Our beam search ends a sentence once it holds `beam` finished hypotheses: transformers'
    early_stopping=True; its default heuristic gave other outputs on a trained model (docs/deploy.md)."""
    from nmt.export import build_hf_model

    model, tokenizer, cfg = load_for_inference(checkpoint)
    beam_cfg = replace(cfg, decode=replace(DECODE, beam=4, lenpen=0.6))
    gen = build_hf_model(model, tokenizer, beam_cfg).generation_config
    assert (gen.early_stopping, gen.num_beams, gen.length_penalty) == (True, 4, 0.6)


def test_failed_export_leaves_the_previous_one_and_no_leftovers(tmp_path):
    from nmt.export import DECODE_FILE, _publish

    out = tmp_path / "ct2"
    out.mkdir()
    (out / DECODE_FILE).write_text("{}")
    (out / "model.bin").write_bytes(b"old")

    def broken(target, scratch):
        target.mkdir()
        (target / "model.bin").write_bytes(b"half")
        raise RuntimeError("converter died")

    with pytest.raises(RuntimeError, match="converter died"):
        _publish(out, True, broken)
    assert (out / "model.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ct2"]
    with pytest.raises(NMTError, match="not a previous nmt export"):
        _publish(tmp_path, True, broken)
