"""Smoke tests of scripts/bench.py's pure parts: the FLOPs formula, summaries, targets, the table."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("bench")
bench_peer = _load("bench_peer")

SIZE = bench.ModelSize(2, 3, 32, 4, 48, dropout=0.0, attention_dropout=0.0)
VOCAB = 50


def _counted_flops(batch: int, src_len: int, tgt_len: int) -> int:
    """FLOPs that torch's FlopCounterMode sees in one forward + backward of an nmt model (no padding)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from nmt.config import ModelConfig
    from nmt.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**asdict(SIZE)), VOCAB, VOCAB)
    src = torch.randint(4, VOCAB, (batch, src_len))
    tgt = torch.randint(4, VOCAB, (batch, tgt_len))
    # The math kernel runs attention as matmuls, which the counter sees (it misses CPU flash kernels).
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(src, tgt).sum().backward()
    return counter.get_total_flops()


def test_train_flops_match_math_attention():
    batch, s, t = 3, 7, 5
    counted = _counted_flops(batch, s, t)
    ours = bench.train_flops(SIZE, VOCAB, [s] * batch, [t] * batch)
    # The math kernel computes every (query, key) pair of the causal decoder self-attention,
    # the formula only the t (t + 1) / 2 allowed ones.
    masked_pairs = batch * (t * t - t * (t + 1) / 2)
    assert ours + 12 * SIZE.d_model * SIZE.decoder_layers * masked_pairs == counted


def test_average_length_form_agrees_with_the_exact_sum():
    exact = bench.train_flops(SIZE, VOCAB, [9] * 4, [6] * 4) / (4 * 6)
    assert bench.flops_per_target_token(SIZE, VOCAB, 9, 6) == pytest.approx(exact)
    with pytest.raises(ValueError):
        bench.train_flops(SIZE, VOCAB, [1, 2], [1])


def test_peak_flops_lookup():
    assert bench.peak_flops("NVIDIA H200", "bf16", tf32=False) == 989.4e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12
    assert bench.peak_flops("AMD EPYC", "fp32", tf32=False) is None


def _record(section, config, precision, framework, run, **metrics):
    return {"section": section, "config": config, "precision": precision, "framework": framework,
            "run": run, "metrics": metrics}


def test_summary_ratios_and_targets():
    records = []
    for run, (ours, peer) in enumerate([(140, 100), (120, 100), (200, 100)]):
        records += [_record("train", "small", "fp32", "ours", run, tokens_per_s=ours, s_per_step=0.5),
                    _record("train", "small", "fp32", "peer", run, tokens_per_s=peer)]
    records += [_record("train", "small", "bf16", "ours", 0, tokens_per_s=150.0),
                _record("train", "small", "bf16", "peer", 0, tokens_per_s=100.0),
                _record("train-memory", "small", "fp32", "ours", 0, peak_mem_mb=90.0),
                _record("train-memory", "small", "fp32", "peer", 0, peak_mem_mb=100.0),
                _record("decode-greedy", "small", "fp32", "ours", 0, sentences_per_s=20.0),
                _record("decode-greedy", "small", "fp32", "peer", 0, sentences_per_s=10.0),
                _record("decode-cost@16", "small", "fp32", "ours", 0, ms_per_token=2.0),
                _record("decode-cost@256", "small", "fp32", "ours", 0, ms_per_token=2.5),
                {**_record("train", "base", "fp32", "ours", 0), "error": "boom"}]
    rows = {(r.section, r.config, r.precision): r for r in bench.summarize(records)}
    fp32 = rows["train", "small", "fp32"]
    assert (fp32.ours, fp32.peer, fp32.ratio, fp32.runs) == (140, 100, 1.4, 3)
    assert fp32.status == "met" and fp32.notes["s_per_step"] == 0.5
    bf16 = rows["train", "small", "bf16"]
    assert bf16.target_value == pytest.approx(150 / 140) and bf16.status == "missed"  # needs 1.8x our fp32
    assert rows["train-memory", "small", "fp32"].status == "met"
    assert rows["decode-greedy", "small", "fp32"].status == "missed"  # 2x, the target is 3x
    flat = rows["decode-cost@256", "small", "fp32"]
    assert flat.target_value == pytest.approx(1.25) and flat.status == "met"
    assert rows["decode-cost@16", "small", "fp32"].status == ""
    assert ("train", "base", "fp32") not in rows


def test_table_has_one_line_per_row_and_marks_targets():
    records = [_record("train", "base", "fp32", "ours", 0, tokens_per_s=1000.0, padding_efficiency=0.9),
               _record("train", "base", "fp32", "peer", 0, tokens_per_s=1000.0)]
    table = bench.format_table(bench.summarize(records))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["section", "config", "prec", "metric"]
    assert len(lines) == 3
    assert "1.00x" in lines[2] and "missed" in lines[2] and ">= 1.1x peer" in lines[2]
    assert "pad eff 0.90" in lines[2]


def test_jobs_alternate_ours_and_peer():
    plan = bench.build_plan(bench.parse_args(["--quick", "--configs", "tiny", "--precision", "fp32,bf16"]))
    assert bench.check_plan(plan) is None
    specs = bench.jobs(plan, {})
    train = [(s["precision"], s["framework"], s["steps"]) for s in specs if s["kind"] == "train"]
    assert train == [("fp32", "ours", 2), ("fp32", "peer", 2), ("bf16", "ours", 1), ("bf16", "peer", 1)]
    assert [s["framework"] for s in specs if s["kind"] == "decode"] == ["ours", "peer"]
    bad = bench.build_plan(bench.parse_args(["--configs", "huge"]))
    assert "huge" in bench.check_plan(bad)


def test_marian_config_matches_the_model_size():
    cfg = bench.model_config("small")
    kwargs = bench_peer.marian_config_kwargs(cfg, 8000)
    assert (kwargs["d_model"], kwargs["encoder_layers"], kwargs["decoder_layers"]) == (256, 3, 3)
    assert (kwargs["encoder_attention_heads"], kwargs["decoder_ffn_dim"]) == (4, 1024)
    assert kwargs["scale_embedding"] and kwargs["tie_word_embeddings"]
    assert kwargs["activation_function"] == "relu" and kwargs["vocab_size"] == 8000
    with pytest.raises(ValueError):
        bench_peer.marian_config_kwargs(cfg.__class__(norm_first=True), 8000)


def test_report_reprints_the_table_from_saved_runs(tmp_path, capsys):
    import json

    saved = tmp_path / "bench.jsonl"
    lines = [{"kind": "run", **_record("decode-beam5", "small", "fp32", fw, 0, sentences_per_s=v)}
             for fw, v in (("ours", 30.0), ("peer", 10.0))] + [{"kind": "summary", "section": "x"}]
    saved.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert bench.main(["--report", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "decode-beam5" in out and "3.00x" in out and "met" in out
