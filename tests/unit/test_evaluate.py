"""evaluate.score against sacreBLEU itself, tokenizer choice, and the evaluate_bleu.py script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from nmt import evaluate
from nmt.errors import NMTError
from nmt.evaluate import bleu_tokenizer_for, format_scores, score, score_streams

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate_bleu.py"
HYPS = ["The cat sat on the mat.", "A dog runs in the park!", "Hello, World", "two men talking"]
REFS = ["The cat is sitting on the mat.", "A dog is running in the park!", "hello, world",
        "Two men are talking."]
REFS2 = ["A cat sat on the mat.", "The dog runs through the park.", "Hello world!", "two men talk"]


def test_score_matches_sacrebleu_directly():
    result = score(HYPS, REFS, "de")
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert result["ter"] == pytest.approx(
        sacrebleu.corpus_ter(HYPS, [REFS], case_sensitive=True).score)
    assert 0 < result["bleu"] < 100
    assert "tok:13a" in result["signature"]["bleu"] and "case:mixed" in result["signature"]["bleu"]
    assert set(result["signature"]) == {"bleu", "chrf", "ter"}


def test_lowercase_changes_case_sensitive_scores():
    mixed, lower = score(HYPS, REFS, "en"), score(HYPS, REFS, "en", lowercase=True)
    assert lower["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], lowercase=True).score)
    assert lower["bleu"] > mixed["bleu"]
    assert "case:lc" in lower["signature"]["bleu"]


def test_tokenizer_follows_target_language(monkeypatch):
    assert bleu_tokenizer_for("de") == "13a"
    assert bleu_tokenizer_for("zh") == "zh" and bleu_tokenizer_for("zh-CN") == "zh"
    zh = score(["我喜欢猫。"], ["我爱猫。"], "zh")
    assert "tok:zh" in zh["signature"]["bleu"]
    assert zh["bleu"] == pytest.approx(sacrebleu.corpus_bleu(["我喜欢猫。"], [["我爱猫。"]],
                                                             tokenize="zh").score)
    monkeypatch.setattr(evaluate, "_tokenizer_available", lambda name: True)
    assert bleu_tokenizer_for("ja") == "ja-mecab" and bleu_tokenizer_for("ko_KR") == "ko-mecab"
    monkeypatch.setattr(evaluate, "_tokenizer_available", lambda name: False)
    with pytest.warns(UserWarning, match="ja-mecab"):
        assert bleu_tokenizer_for("ja") == "13a"


def test_multiple_references_and_errors():
    two = score_streams(HYPS, [REFS, REFS2], metrics=("bleu",))
    assert two["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score)
    assert set(two) == {"bleu", "signature"}
    with pytest.raises(NMTError, match="4 hypotheses but 3 references"):
        score(HYPS, REFS[:3], "en")
    with pytest.raises(NMTError):
        score([], [], "en")


def test_format_scores_is_one_readable_line():
    line = format_scores(score(HYPS, REFS, "en"))
    assert "\n" not in line
    assert line.startswith("BLEU ") and "chrF2 " in line and "TER " in line and "tok:13a" in line


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)


def test_script_prints_matching_json_and_refuses_mismatched_files(tmp_path):
    hyp, ref, ref2, short = (tmp_path / n for n in ("hyp", "ref", "ref2", "short"))
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    ref2.write_text("\n".join(REFS2) + "\n", encoding="utf-8")
    short.write_text("\n".join(REFS[:3]) + "\n", encoding="utf-8")

    done = run_script(str(hyp), str(ref), str(ref2), "--lowercase")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    metric = sacrebleu.BLEU(lowercase=True)
    assert data["bleu"] == pytest.approx(metric.corpus_score(HYPS, [REFS, REFS2]).score)
    assert data["signature"]["bleu"] == str(metric.get_signature())
    assert "chrf" in data and "BLEU" in done.stderr

    bad = run_script(str(hyp), str(short))
    assert bad.returncode == 2
    assert bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: ") and "4 lines" in bad.stderr and "3" in bad.stderr

    tok = run_script(str(hyp), str(ref), "--tokenize", "char")
    assert "tok:char" in json.loads(tok.stdout)["signature"]["bleu"]


def test_lm_validation_is_loss_and_perplexity_without_decoding(tmp_path, corpus_dir, monkeypatch):
    import math

    import torch
    from tests.unit.prepare_helpers import Log, make_cfg

    from nmt.config import ModelConfig
    from nmt.data.prepare import prepare_data
    from nmt.model import build_model

    cfg = make_cfg(tmp_path, corpus_dir)
    cfg.task, cfg.data.lang, cfg.train.precision = "lm", "de", "fp32"
    cfg.model = ModelConfig(arch="decoder_only", decoder_layers=1, d_model=16, heads=2, d_ff=32, max_positions=256)
    data = prepare_data(cfg, log=Log())
    torch.manual_seed(0)
    model = build_model(cfg.model, data.tokenizer.src_vocab_size, data.tokenizer.tgt_vocab_size)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a language model decodes nothing on validation")

    monkeypatch.setattr("nmt.translate.translate_lines", no_decoding)
    result = evaluate.evaluate_model(model.train(), data, cfg, torch.device("cpu"))
    assert set(result) == {"valid_loss", "valid_ppl"} and model.training
    assert result["valid_ppl"] == pytest.approx(math.exp(result["valid_loss"]))
    # an untrained model is close to uniform over the vocabulary
    assert abs(result["valid_loss"] - math.log(data.tokenizer.tgt_vocab_size)) < 1.0
