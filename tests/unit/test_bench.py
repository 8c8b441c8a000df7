"""Tests of scripts/bench.py: the FLOPs formula, summaries, the table, and a few-step training run
of ours and the peer on the planned batches."""

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


def test_summary_ratios_and_cost_growth():
    records = []
    for run, (ours, peer) in enumerate([(140, 100), (120, 100), (200, 100)]):
        records += [_record("train", "small", "fp32", "ours", run, tokens_per_s=ours, s_per_step=0.5),
                    _record("train", "small", "fp32", "peer", run, tokens_per_s=peer)]
    records += [_record("train-memory", "small", "fp32", "ours", 0, peak_mem_mb=90.0),
                _record("train-memory", "small", "fp32", "peer", 0, peak_mem_mb=100.0),
                _record("decode-cost@16", "small", "fp32", "ours", 0, ms_per_token=2.0),
                _record("decode-cost@256", "small", "fp32", "ours", 0, ms_per_token=2.5),
                {**_record("train", "base", "fp32", "ours", 0), "error": "boom"}]
    rows = {(r.section, r.config, r.precision): r for r in bench.summarize(records)}
    fp32 = rows["train", "small", "fp32"]
    assert (fp32.ours, fp32.peer, fp32.ratio, fp32.runs) == (140, 100, 1.4, 3)
    assert fp32.notes["s_per_step"] == 0.5
    assert rows["train-memory", "small", "fp32"].ratio == pytest.approx(0.9)
    assert rows["decode-cost@256", "small", "fp32"].notes["cost_growth"] == pytest.approx(1.25)
    assert ("train", "base", "fp32") not in rows


def test_table_has_one_line_per_row_and_no_targets():
    records = [_record("train", "base", "fp32", "ours", 0, tokens_per_s=1000.0, padding_efficiency=0.9),
               _record("train", "base", "fp32", "peer", 0, tokens_per_s=1000.0),
               _record("decode-cost@16", "small", "fp32", "ours", 0, ms_per_token=2.0),
               _record("decode-cost@64", "small", "fp32", "ours", 0, ms_per_token=3.0)]
    table = bench.format_table(bench.summarize(records))
    lines = table.splitlines()
    assert lines[0].split() == ["section", "config", "prec", "metric", "ours", "peer", "ours/peer", "runs", "notes"]
    assert len(lines) == 5
    assert "1.00x" in lines[2] and "pad eff 0.90" in lines[2]
    assert "1.50x cost@16" in lines[4]
    assert not {"target", "met", "missed"} & set(table.split())


def _train_spec(corpus: Path, work_dir: Path, framework: str) -> dict:
    return {"data_dir": str(corpus), "work_dir": str(work_dir), "device": "cpu", "threads": 1, "seed": 1,
            "batch_tokens": 256, "config": "tiny", "precision": "fp32", "framework": framework,
            "warmup": 1, "steps": 2, "peak_tflops": None}


@pytest.fixture
def small_vocab(monkeypatch):
    """The benchmark's tokenizer settings, sized for the small test corpus."""
    from nmt.config import DataConfig, TokenizerConfig

    monkeypatch.setattr(bench, "_data_configs", lambda data_dir: (
        DataConfig(dir=data_dir), TokenizerConfig(vocab_size=256, model_type="bpe", joint=True)))


@pytest.mark.slow
def test_ours_and_the_peer_train_on_the_same_planned_batches(small_corpus, tmp_path, small_vocab,
                                                              one_torch_thread):
    pytest.importorskip("transformers", reason="the peer needs transformers (nmt[bench])")
    results = {fw: bench.worker_train(_train_spec(small_corpus, tmp_path / fw, fw)) for fw in ("ours", "peer")}
    ours, peer = (results[fw]["metrics"] for fw in ("ours", "peer"))
    # the same batches: the same tokens, padding and FLOPs on both sides
    for key in ("padding_efficiency", "flops_per_token"):
        assert ours[key] == peer[key]
    assert len(results["ours"]["step_times"]) == len(results["peer"]["step_times"]) == 2
    assert "same_batches" not in ours


@pytest.mark.slow
def test_ours_fails_loudly_when_the_trainer_draws_other_batches(small_corpus, tmp_path, small_vocab,
                                                                monkeypatch, one_torch_thread):
    planned = bench._batch_plan
    monkeypatch.setattr(bench, "_batch_plan", lambda data, cfg, n: planned(data, cfg, n + 1)[1:])
    with pytest.raises(bench.BatchMismatch, match="other batches than planned: batch 1"):
        bench.worker_train(_train_spec(small_corpus, tmp_path / "ours", "ours"))


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
    assert "decode-beam5" in out and "3.00x" in out
