"""Training and decoding speed of nmt, side by side with a Hugging Face Marian peer of the same size.

Usage (from the repository root; the peer needs ``pip install -e '.[bench]'``)::

    .venv/bin/python scripts/bench.py                      # everything: train + decode, 3 runs
    .venv/bin/python scripts/bench.py --quick --precision fp32 --out bench.jsonl   # a smoke run
    .venv/bin/python scripts/bench.py --train --configs small,base --precision fp32,bf16 --runs 5
    .venv/bin/python scripts/bench.py --decode --no-peer
    .venv/bin/python scripts/bench.py --report bench.jsonl   # the table again, from saved runs

Every measurement runs in a fresh subprocess (one per section, config, precision, framework and
run), so peak memory is per run; ours and the peer alternate (ours, peer, ours, peer, ...) and the
table shows medians and the median of the pairwise ratios ours / peer. Each record is printed as a
JSON line (and appended to ``--out``); the readable table follows. A worker that fails (for example
because the batches differ, below) makes the whole run exit with status 1. Run the full benchmark on
a quiet machine: a busy CPU distorts the figures.

Data: Multi30k EN-DE is prepared once with ``nmt.data.prepare.prepare_data`` (joint 8000 BPE) into
``--work-dir``; both frameworks train on the same planned batches of ``--batch-tokens`` (4096)
padded tokens per side: the first batches of a fresh ``TokenBatchSampler`` with the run's seed. The
peer collates the plan itself; ours draws its batches through the Trainer's own sampler and
prefetcher, as ``nmt train`` does, and every batch it draws is compared with the plan: a batch
that differs stops the worker with an error, so the side-by-side ratio always compares the same work.

Training (section ``train``): ours is ``nmt.train.Trainer.train_step`` itself, the production step
(collate, forward under autocast, ``nmt.loss.Objective``, backward, clip, Adam from ``nmt.optim``,
scheduler step, the non-finite check), with ``clip_norm`` 1.0 and label smoothing 0.1. The peer runs a
plain PyTorch loop doing the same work (``scripts/bench_peer.py``). Steps ``--warmup`` (5) are untimed,
then ``--steps`` (30) are timed: target (non-pad) tokens/s, s/step, padding efficiency, and peak
memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak RSS growth during training
(VmHWM, reset through ``/proc/self/clear_refs`` after set-up, minus the RSS at that point), so the
imports and data of each process do not count. Ours calls ``nmt.runtime.keep_freed_memory`` as
``nmt train`` does; the peer runs as plain PyTorch unless ``--peer-malloc-tuning``.

Model FLOPs and MFU. d = d_model, f = d_ff, V = vocabulary, Le / Ld = encoder / decoder layers. For
sentence i of a batch: s_i source positions (incl. EOS), t_i target positions (BOS y1..yn, i.e. the
non-pad tokens of tgt_out). A weight matrix costs 2 FLOPs per weight per position forward and 4
backward (input and weight gradients): 6 per weight per position it is applied to. Weights by the
positions they see:

    encoder layer, every source position:      We  = 4d^2 (Q, K, V, O) + 2df (FFN)
    decoder layer, every target position:      Wdt = 4d^2 (self Q, K, V, O) + 2d^2 (cross Q, O) + 2df
    decoder layer, every source position:      Wds = 2d^2 (cross K, V of the encoder output)
    output projection, every target position:  d V   (tied to the embeddings, but a full matmul)

Attention: QK^T and AV cost 2d FLOPs each per (query, key) pair summed over heads, 4d forward, 12d
forward + backward. Pairs: encoder self s_i^2, decoder self t_i (t_i + 1) / 2 (causal: only allowed
pairs count), cross t_i s_i. So per step

    F = 6 [(Le We + Ld Wds) sum s_i + (Ld Wdt + d V) sum t_i]
      + 12 d [Le sum s_i^2 + Ld sum t_i (t_i + 1) / 2 + Ld sum s_i t_i]

and FLOPs per target token = F / sum t_i. With average lengths S, T this is
6 [(Le We + Ld Wds) S/T + Ld Wdt + d V] + 12 d [Le S^2/T + Ld (T + 1)/2 + Ld S] — i.e. 6 x (non-embedding
parameters + output projection) per token plus the attention terms, each weight counted for the side
it runs on. Ignored: biases, LayerNorm, softmax, dropout, the loss and the optimizer (O(parameters),
not O(parameters x tokens)); padded positions count as waste, not as model FLOPs.
MFU = tokens/s x FLOPs per token / peak FLOP/s, reported on CUDA for known GPUs (H100/H200, A100)
or with ``--peak-tflops``; achieved TFLOP/s are reported everywhere.

Decoding (sections ``decode-greedy`` and ``decode-beam5``): a freshly initialised ``--decode-config``
(small) model, the first ``--decode-sentences`` (500) test_2016_flickr sentences in batches of
``--decode-batch`` (64), in file order. Output lengths are forced so that untrained weights give a
fixed amount of work: ours ``max_len_a=0, max_len_b=32, min_len=32`` through ``nmt.decoding``'s
``greedy_search`` / ``beam_search`` (tokenization excluded; ours then spends one more step on the
forced EOS), the peer ``generate(min_new_tokens=32, max_new_tokens=32, num_beams=5 or 1)``.
Sentences/s and generated tokens/s. Sections ``decode-cost@L``: the time per generated token of
greedy search at forced lengths 16, 64 and 256 on ``--sweep-sentences`` (64) sentences, the median
of ``--sweep-repeats`` (3); incremental decoding should keep it roughly flat, so the table also
gives each length's cost over the cost at the shortest length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
FRAMEWORKS = ("ours", "peer")
PRECISIONS = ("fp32", "bf16", "fp16")

# ---------------------------------------------------------------------------------------------
# model sizes


@dataclass(frozen=True)
class ModelSize:
    """The fields of nmt's ModelConfig that the harness sets (the rest keep their defaults)."""

    encoder_layers: int
    decoder_layers: int
    d_model: int
    heads: int
    d_ff: int
    dropout: float = 0.1
    attention_dropout: float = 0.1
    norm_first: bool = False  # post-norm: the paper's and Marian's layout
    max_positions: int = 1024


SIZES: dict[str, ModelSize] = {
    # configs/tiny.yaml's model
    "tiny": ModelSize(2, 2, 64, 4, 128, dropout=0.1, attention_dropout=0.0, max_positions=256),
    # the size of configs/multi30k_en_de.yaml, post-norm so that the peer has the same architecture
    "small": ModelSize(3, 3, 256, 4, 1024),
    # configs/transformer_base.yaml
    "base": ModelSize(6, 6, 512, 8, 2048),
}


def model_config(name: str):
    from nmt.config import ModelConfig

    return ModelConfig(**asdict(SIZES[name]))


# ---------------------------------------------------------------------------------------------
# FLOPs (see the module docstring for the derivation)


def weight_flops_per_position(size: ModelSize, vocab: int) -> tuple[float, float]:
    """(FLOPs per source position, FLOPs per target position) of the weight matmuls, fwd + bwd."""
    d, f = size.d_model, size.d_ff
    w_enc = 4 * d * d + 2 * d * f
    w_dec_tgt = 4 * d * d + 2 * d * d + 2 * d * f
    w_dec_src = 2 * d * d
    per_src = 6 * (size.encoder_layers * w_enc + size.decoder_layers * w_dec_src)
    per_tgt = 6 * (size.decoder_layers * w_dec_tgt + d * vocab)
    return float(per_src), float(per_tgt)


def train_flops(size: ModelSize, vocab: int, src_lens: Sequence[int], tgt_lens: Sequence[int]) -> float:
    """Model FLOPs (forward + backward) of one training step over sentences with these lengths.

    src_lens: source positions per sentence incl. EOS; tgt_lens: target positions (= non-pad tgt_out).
    """
    if len(src_lens) != len(tgt_lens):
        raise ValueError("src_lens and tgt_lens must have the same length")
    per_src, per_tgt = weight_flops_per_position(size, vocab)
    n_src, n_tgt = sum(src_lens), sum(tgt_lens)
    enc_pairs = sum(s * s for s in src_lens)
    self_pairs = sum(t * (t + 1) / 2 for t in tgt_lens)
    cross_pairs = sum(s * t for s, t in zip(src_lens, tgt_lens, strict=True))
    d = size.d_model
    attention = 12 * d * (size.encoder_layers * enc_pairs
                          + size.decoder_layers * (self_pairs + cross_pairs))
    return per_src * n_src + per_tgt * n_tgt + attention


def flops_per_target_token(size: ModelSize, vocab: int, avg_src: float, avg_tgt: float) -> float:
    """The average-length form of ``train_flops`` / target tokens (all sentences S and T long)."""
    per_src, per_tgt = weight_flops_per_position(size, vocab)
    d, le, ld = size.d_model, size.encoder_layers, size.decoder_layers
    attention = 12 * d * (le * avg_src**2 / avg_tgt + ld * (avg_tgt + 1) / 2 + ld * avg_src)
    return per_src * avg_src / avg_tgt + per_tgt + attention


# Dense peak FLOP/s by GPU name and math mode: (bf16/fp16 tensor core, tf32, plain fp32).
PEAK_FLOPS = {
    "H200": (989.4e12, 494.7e12, 66.9e12),
    "H100": (989.4e12, 494.7e12, 66.9e12),
    "A100": (312e12, 156e12, 19.5e12),
}


def peak_flops(device_name: str, precision: str, tf32: bool) -> float | None:
    for key, (half, tf, fp32) in PEAK_FLOPS.items():
        if key in device_name.upper():
            return half if precision in ("bf16", "fp16") else (tf if tf32 else fp32)
    return None


# ---------------------------------------------------------------------------------------------
# summary


# section -> (metric shown in the table, unit, higher is better)
PRIMARY = {
    "train": ("tokens_per_s", "tgt tok/s", True),
    "train-memory": ("peak_mem_mb", "MB", False),
    "decode-greedy": ("sentences_per_s", "sent/s", True),
    "decode-beam5": ("sentences_per_s", "sent/s", True),
}


def primary_metric(section: str) -> tuple[str, str, bool]:
    if section.startswith("decode-cost@"):
        return "ms_per_token", "ms/tok", False
    return PRIMARY[section]


def median(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


@dataclass
class Row:
    section: str
    config: str
    precision: str
    metric: str
    unit: str
    ours: float | None
    peer: float | None
    ratio: float | None  # median over runs of ours_i / peer_i
    runs: int
    notes: dict[str, Any] = field(default_factory=dict)


def summarize(records: Sequence[dict[str, Any]]) -> list[Row]:
    """Rows per (section, config, precision) from run records.

    A record: {"section", "config", "precision", "framework", "run", "metrics": {name: value}}.
    """
    groups: dict[tuple[str, str, str], dict[str, dict[int, dict[str, float]]]] = {}
    for r in records:
        if r.get("error"):
            continue
        key = (r["section"], r["config"], r["precision"])
        groups.setdefault(key, {}).setdefault(r["framework"], {})[r["run"]] = r["metrics"]
    rows = []
    for (section, config, precision), by_fw in groups.items():
        metric, unit, _ = primary_metric(section)
        ours_runs, peer_runs = by_fw.get("ours", {}), by_fw.get("peer", {})
        ours = median(m.get(metric) for m in ours_runs.values())
        peer = median(m.get(metric) for m in peer_runs.values())
        pairs = [ours_runs[i][metric] / peer_runs[i][metric] for i in sorted(ours_runs)
                 if i in peer_runs and ours_runs[i].get(metric) and peer_runs[i].get(metric)]
        notes = {}
        for extra in ("s_per_step", "padding_efficiency", "tflops", "mfu", "tokens_per_s", "forced_ok"):
            if extra != metric:
                value = median(float(m[extra]) for m in ours_runs.values() if m.get(extra) is not None)
                if value is not None:
                    notes[extra] = value
        rows.append(Row(section, config, precision, metric, unit, ours, peer, median(pairs),
                        max(len(ours_runs), len(peer_runs)), notes=notes))
    _note_cost_growth(rows)
    return sorted(rows, key=_row_order)


def _row_order(row: Row) -> tuple:
    sections = ["train", "train-memory", "decode-greedy", "decode-beam5"]
    sec = sections.index(row.section) if row.section in sections else len(sections)
    length = int(row.section.split("@")[1]) if "@" in row.section else 0
    cfgs = list(SIZES)
    prec = PRECISIONS.index(row.precision) if row.precision in PRECISIONS else 99
    return (sec, length, cfgs.index(row.config) if row.config in cfgs else 99, prec, row.precision)


def _note_cost_growth(rows: list[Row]) -> None:
    """Each decode-cost@L row notes its cost over the cost at the sweep's shortest length."""
    index = {(r.section, r.config, r.precision): r for r in rows}
    for row in rows:
        if not row.section.startswith("decode-cost@"):
            continue
        lengths = sorted(int(s.split("@")[1]) for s, c, p in index
                         if s.startswith("decode-cost@") and c == row.config and p == row.precision)
        first = index[(f"decode-cost@{lengths[0]}", row.config, row.precision)]
        if first.ours and row.ours:
            row.notes["cost_growth"] = row.ours / first.ours
            row.notes["cost_base"] = lengths[0]


def _fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if abs(value) >= 100 else (1 if abs(value) >= 10 else 3)
    return f"{value:,.{digits}f}"


def format_table(rows: Sequence[Row]) -> str:
    """The readable table: one line per (section, config, precision)."""
    header = ["section", "config", "prec", "metric", "ours", "peer", "ours/peer", "runs", "notes"]
    lines = []
    for r in rows:
        notes = []
        if "s_per_step" in r.notes:
            notes.append(f"{r.notes['s_per_step']:.3f} s/step")
        if "padding_efficiency" in r.notes:
            notes.append(f"pad eff {r.notes['padding_efficiency']:.2f}")
        if "tflops" in r.notes:
            notes.append(f"{r.notes['tflops']:.3f} TFLOP/s")
        if "mfu" in r.notes:
            notes.append(f"MFU {100 * r.notes['mfu']:.1f}%")
        if "tokens_per_s" in r.notes and r.section.startswith("decode-") and "@" not in r.section:
            notes.append(f"{r.notes['tokens_per_s']:,.0f} gen tok/s")
        if r.notes.get("forced_ok") == 0:
            notes.append("output lengths NOT as forced")
        if "cost_growth" in r.notes:
            notes.append(f"{r.notes['cost_growth']:.2f}x cost@{r.notes['cost_base']}")
        lines.append([r.section, r.config, r.precision, r.unit, _fmt(r.ours), _fmt(r.peer),
                      "-" if r.ratio is None else f"{r.ratio:.2f}x", str(r.runs), "; ".join(notes)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    right = {4, 5, 6}

    def render(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [render(header), render(["-" * w for w in widths])]
    out += [render(line) for line in lines]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# workers: each runs in a fresh process and prints one RESULT_PREFIX + JSON line


def _data_configs(data_dir: str):
    from nmt.config import DataConfig, TokenizerConfig

    return (DataConfig(dir=data_dir),
            TokenizerConfig(vocab_size=8000, model_type="bpe", joint=True))


def _rss_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the code between ``start`` and ``stop``: CUDA allocator or CPU RSS growth."""

    def __init__(self, device) -> None:
        self.device = device
        self.baseline: float | None = None
        self.reset_ok = False

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated() / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.baseline = _rss_mb("VmRSS")

    def stop(self) -> dict[str, float | None]:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {"peak_mem_mb": peak, "peak_total_mb": peak, "baseline_mb": self.baseline,
                    "memory_kind": "cuda_max_allocated"}
        hwm = _rss_mb("VmHWM")
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        growth = hwm - self.baseline if self.baseline is not None else None
        return {"peak_mem_mb": growth, "peak_total_mb": hwm, "baseline_mb": self.baseline,
                "memory_kind": "rss_growth" if self.reset_ok else "rss_growth_unreset"}


def _batch_plan(data, cfg, n: int) -> list[list[int]]:
    """The first ``n`` training batches (example indices) of a fresh sampler, as Trainer draws them."""
    import itertools

    from nmt.data.batching import TokenBatchSampler

    sampler = TokenBatchSampler(data.train.src.lengths(), data.train.tgt.lengths(),
                                cfg.train.batch_tokens, seed=cfg.train.seed)
    return list(itertools.islice(iter(sampler), n))


class BatchMismatch(RuntimeError):
    """Ours and the peer would train on different batches: the comparison would be meaningless."""


class PlannedBatches:
    """The Trainer's batch stream, checked batch by batch against the plan the peer trains on.

    Wraps ``Trainer.batches`` (sampler, collation and prefetch thread stay the production ones) and
    raises ``BatchMismatch`` at the first batch that is not the planned one, or when more batches
    are drawn than planned. Other attributes (``position_dict``, ``close``) are the wrapped ones.
    """

    def __init__(self, batches, planned: Sequence[Any]) -> None:
        import torch

        self._batches, self._planned, self.drawn = batches, planned, 0
        self._equal = torch.equal

    def __iter__(self) -> PlannedBatches:
        return self

    def __next__(self):
        batch = next(self._batches)
        if self.drawn >= len(self._planned):
            raise BatchMismatch(f"the Trainer drew batch {self.drawn + 1}, but only "
                                f"{len(self._planned)} were planned")
        expected = self._planned[self.drawn]
        for name in ("src", "tgt_in", "tgt_out"):
            got, want = getattr(batch, name), getattr(expected, name)
            if got.shape != want.shape or not self._equal(got, want):
                raise BatchMismatch(f"the Trainer drew other batches than planned: batch {self.drawn + 1}, "
                                    f"{name} {tuple(got.shape)} instead of {tuple(want.shape)}"
                                    + ("" if got.shape != want.shape else " with other tokens"))
        self.drawn += 1
        return batch

    def __getattr__(self, name: str):
        return getattr(self._batches, name)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_config(spec: dict[str, Any]):
    from nmt.config import Config, TrainConfig

    data_cfg, tok_cfg = _data_configs(spec["data_dir"])
    train = TrainConfig(max_steps=10**9, batch_tokens=spec["batch_tokens"], clip_norm=1.0,
                        label_smoothing=0.1, precision=spec["precision"], device=spec["device"],
                        seed=spec["seed"], log_every=10**9, valid_every=0, save_every=10**9,
                        keep_last=0, threads=spec["threads"])
    return Config(run_dir=spec["work_dir"], data=data_cfg, tokenizer=tok_cfg,
                  model=model_config(spec["config"]), train=train)


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from nmt.data.batching import collate
    from nmt.optim import inverse_sqrt_lr, peak_lr

    cfg = _train_config(spec)
    warmup, steps = spec["warmup"], spec["steps"]
    if spec["framework"] == "ours":
        from nmt.train import Trainer

        trainer = Trainer(cfg, log=lambda _msg: None)
        trainer.model.train()
        device, data, vocab = trainer.device, trainer.data, trainer.data.tokenizer.tgt_vocab_size
        plan = _batch_plan(data, cfg, warmup + steps)
        trainer.batches = PlannedBatches(trainer.batches, [collate(data.train, idx) for idx in plan])
        params = sum(p.numel() for p in trainer.model.parameters())

        def step() -> None:
            trainer.train_step()
            trainer.state.step += 1

        def mean_loss() -> float | None:
            w = getattr(trainer, "_window", None)
            try:
                return float(w.loss) / w.tokens
            except Exception:  # the window is private: optional
                return None
    else:
        import bench_peer

        from nmt.data.prepare import prepare_data
        from nmt.runtime import resolve_device

        torch.set_num_threads(spec["threads"])
        device = resolve_device(spec["device"])
        data = prepare_data(cfg, log=lambda _msg: None)
        vocab = data.tokenizer.tgt_vocab_size
        torch.manual_seed(cfg.train.seed)
        model = bench_peer.build_marian(cfg.model, vocab, device)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        peak = peak_lr(cfg.train, cfg.model)
        t = cfg.train
        peer = bench_peer.PeerTrainer(model, lambda s: inverse_sqrt_lr(s, peak, t.warmup_steps),
                                      t.label_smoothing, t.clip_norm, t.adam_betas, t.adam_eps,
                                      t.precision, device)
        plan = _batch_plan(data, cfg, warmup + steps)
        peer_batches = iter(plan)
        n_tokens = [0]

        def step() -> None:
            batch = collate(data.train, next(peer_batches))
            n_tokens[0] += batch.n_tgt_tokens
            peer.step(batch)

        def mean_loss() -> float | None:
            return float(peer.loss_sum) / max(n_tokens[0], 1)

    memory = PeakMemory(device)
    memory.start()
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    mem = memory.stop()

    src_len = np.asarray(data.train.src.lengths()) + 1
    tgt_len = np.asarray(data.train.tgt.lengths()) + 1
    if spec["framework"] == "ours" and trainer.batches.drawn != warmup + steps:
        raise BatchMismatch(f"the Trainer drew {trainer.batches.drawn} batches, {warmup + steps} were planned")
    timed = plan[warmup:]  # the batches both frameworks consumed
    tokens = flops = real = padded = 0.0
    for indices in timed:
        s, t = src_len[indices], tgt_len[indices]
        tokens += float(t.sum())
        real += float(s.sum() + t.sum())
        padded += len(indices) * float(s.max() + t.max())
        flops += train_flops(SIZES[spec["config"]], vocab, s.tolist(), t.tolist())
    total = sum(times)
    metrics = {
        "tokens_per_s": tokens / total,
        "s_per_step": total / len(times),
        "s_per_step_median": statistics.median(times),
        "padding_efficiency": real / padded,
        "flops_per_token": flops / tokens,
        "tflops": flops / total / 1e12,
        "params": params,
        "mean_loss": mean_loss(),
        **mem,
    }
    peak = spec.get("peak_tflops")
    if not peak and device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        found = peak_flops(torch.cuda.get_device_name(device), spec["precision"], tf32)
        peak = found / 1e12 if found else None
    if peak:
        metrics["mfu"] = flops / total / (peak * 1e12)
    return {"metrics": metrics, "step_times": times}


def _decode_batches(spec: dict[str, Any], data, n_sentences: int):
    from nmt.data.batching import collate

    test = data.test
    n = min(n_sentences, len(test))
    out = []
    for i in range(0, n, spec["decode_batch"]):
        batch = collate(test, list(range(i, min(i + spec["decode_batch"], n))))
        out.append(batch.src)
    return out


def worker_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """All decoding measurements of one framework in one process: greedy, beam, the length sweep."""
    import torch

    from nmt.data.prepare import prepare_data
    from nmt.runtime import resolve_device
    from nmt.tokenizer import PAD_ID

    cfg = _train_config({**spec, "batch_tokens": 4096, "warmup": 0, "steps": 0})
    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    data = prepare_data(cfg, log=lambda _msg: None)
    vocab = data.tokenizer.tgt_vocab_size
    torch.manual_seed(spec["seed"])
    precision = spec["precision"]
    if spec["framework"] == "ours":
        from nmt.decoding import beam_search, greedy_search
        from nmt.model import build_model
        from nmt.runtime import autocast_context

        model = build_model(cfg.model, vocab, vocab).to(device).eval()

        def run(src: torch.Tensor, beam: int, length: int) -> list[int]:
            src = src.to(device)
            limits = dict(max_len_a=0.0, max_len_b=length, min_len=length)
            with autocast_context(device, precision):
                if beam == 1:
                    hyps = greedy_search(model, src, src.eq(PAD_ID), **limits)
                else:
                    hyps = [h[0] for h in beam_search(model, src, src.eq(PAD_ID), beam=beam, **limits)]
            return [len(h.tokens) for h in hyps]
    elif spec.get("peer_engine") == "ctranslate2":
        run = _ct2_runner(spec, cfg, data.tokenizer)
    else:
        import bench_peer

        model = bench_peer.build_marian(cfg.model, vocab, device).eval()

        def run(src: torch.Tensor, beam: int, length: int) -> list[int]:
            out = bench_peer.generate(model, src.to(device), beam, length, precision, device)
            return [out.size(1) - 1] * out.size(0)  # decoder start token + generated tokens

    def timed(batches, beam: int, length: int) -> dict[str, float]:
        run(batches[0][:2], beam, length)  # warm-up at full length: buffers grown, kernels chosen
        _sync(device)
        sentences = generated = 0
        ok = True
        start = time.perf_counter()
        for src in batches:
            lengths = run(src, beam, length)
            sentences += len(lengths)
            generated += sum(lengths)
            ok &= all(n == length for n in lengths)
        _sync(device)
        elapsed = time.perf_counter() - start
        return {"sentences_per_s": sentences / elapsed, "tokens_per_s": generated / elapsed,
                "ms_per_token": 1000 * elapsed / max(generated, 1), "seconds": elapsed,
                "sentences": sentences, "forced_ok": float(ok)}

    results: dict[str, dict[str, float]] = {}
    batches = _decode_batches(spec, data, spec["decode_sentences"])
    for search in spec["searches"]:
        beam = 1 if search == "greedy" else int(search.removeprefix("beam"))
        results[f"decode-{search}"] = timed(batches, beam, spec["decode_length"])
    sweep = _decode_batches(spec, data, spec["sweep_sentences"])
    for length in spec["sweep_lengths"]:
        # short runs: the median of a few repeats is steadier than one
        repeats = [timed(sweep, 1, length) for _ in range(spec.get("sweep_repeats", 1))]
        results[f"decode-cost@{length}"] = min(
            repeats, key=lambda r: abs(r["ms_per_token"] - median(x["ms_per_token"] for x in repeats)))
    return {"sections": results}


def _ct2_runner(spec: dict[str, Any], cfg, tokenizer):
    """The peer as CTranslate2 (``--peer-engine ctranslate2``): our freshly initialised model through
    ``nmt.export`` (the same weights as ours with the same seed), run with ``--ct2-compute-type``."""
    import ctranslate2
    import torch

    from nmt.export import build_hf_model
    from nmt.model import build_model
    from nmt.tokenizer import PAD_ID

    model = build_model(cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).eval()
    folder = Path(tempfile.mkdtemp(prefix="nmt_bench_ct2_"))
    hf_dir = folder / "hf"
    build_hf_model(model, tokenizer, cfg).save_pretrained(hf_dir)
    from nmt.export import _ct2_converter, _write_tokenizer

    _write_tokenizer(tokenizer, cfg, hf_dir)
    _ct2_converter(hf_dir, cfg.model.norm_first).convert(str(folder / "ct2"), force=True)
    translator = ctranslate2.Translator(str(folder / "ct2"), device="cpu", intra_threads=spec["threads"],
                                        compute_type=spec.get("ct2_compute_type", "default"))
    state = tokenizer.to_state()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=state.get("joint", state.get("src")))

    def run(src: torch.Tensor, beam: int, length: int) -> list[int]:
        pieces = [[sp.id_to_piece(i) for i in row if i != PAD_ID] for row in src.tolist()]
        out = translator.translate_batch(pieces, beam_size=beam, min_decoding_length=length,
                                         max_decoding_length=length, max_batch_size=len(pieces))
        return [len(r.hypotheses[0]) for r in out]

    return run


def worker_main(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if spec["framework"] == "ours" or spec.get("peer_malloc_tuning"):
        from nmt.runtime import keep_freed_memory

        keep_freed_memory()  # what `nmt train` / `nmt translate` do at start-up
    import torch

    torch.set_num_threads(spec["threads"])
    result = worker_train(spec) if spec["kind"] == "train" else worker_decode(spec)
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    if spec["framework"] == "peer":
        import transformers

        result["transformers"] = transformers.__version__
        if spec.get("peer_engine") == "ctranslate2":
            import ctranslate2

            result["ctranslate2"] = ctranslate2.__version__
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# the parent: plan, run the workers, collect, print


@dataclass
class Plan:
    """Everything a run of the harness does, resolved from the command line."""

    train: bool
    decode: bool
    configs: list[str]
    precisions: list[str]
    runs: int
    warmup: int
    steps: int
    bf16_warmup: int
    bf16_steps: int
    decode_config: str
    decode_precision: str
    searches: list[str]
    decode_sentences: int
    decode_batch: int
    decode_length: int
    sweep_sentences: int
    sweep_lengths: list[int]
    sweep_repeats: int
    peer: bool


def build_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    both = not args.train and not args.decode
    pick = lambda value, full, fast: value if value is not None else (fast if quick else full)  # noqa: E731
    return Plan(
        train=args.train or both,
        decode=args.decode or both,
        configs=_split(args.configs),
        precisions=_split(args.precision),
        runs=pick(args.runs, 3, 1),
        warmup=pick(args.warmup, 5, 1),
        steps=pick(args.steps, 30, 2),
        bf16_warmup=pick(args.bf16_warmup, args.warmup if args.warmup is not None else 5, 1),
        bf16_steps=pick(args.bf16_steps, args.steps if args.steps is not None else 30, 1),
        decode_config=args.decode_config,
        decode_precision=args.decode_precision,
        searches=_split(args.searches),
        decode_sentences=pick(args.decode_sentences, 500, 64),
        decode_batch=args.decode_batch,
        decode_length=args.decode_length,
        sweep_sentences=pick(args.sweep_sentences, 64, 8),
        sweep_lengths=[int(x) for x in _split(args.sweep_lengths)],
        sweep_repeats=pick(args.sweep_repeats, 3, 1),
        peer=not args.no_peer,
    )


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def check_plan(plan: Plan) -> str | None:
    """The first problem with the plan's names and numbers, or None."""
    unknown = [c for c in plan.configs + [plan.decode_config] if c not in SIZES]
    if unknown:
        return f"unknown config {unknown[0]!r}; choose from {', '.join(SIZES)}"
    bad = [p for p in plan.precisions + [plan.decode_precision] if p not in PRECISIONS]
    if bad:
        return f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}"
    bad = [s for s in plan.searches if s != "greedy" and not (s.startswith("beam") and s[4:].isdigit())]
    if bad:
        return f"unknown search {bad[0]!r}; use greedy or beamK (e.g. beam5)"
    if min(plan.runs, plan.steps, plan.bf16_steps, plan.decode_batch, plan.decode_length) < 1:
        return "--runs, --steps, --bf16-steps, --decode-batch and --decode-length must be >= 1"
    return None


def jobs(plan: Plan, common: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker specs in execution order: per (config, precision) the runs alternate ours, peer."""
    frameworks = ["ours", "peer"] if plan.peer else ["ours"]
    out = []
    if plan.train:
        for config in plan.configs:
            for precision in plan.precisions:
                half = precision != "fp32"
                for run in range(plan.runs):
                    for fw in frameworks:
                        out.append({**common, "kind": "train", "section": "train", "config": config,
                                    "precision": precision, "framework": fw, "run": run,
                                    "warmup": plan.bf16_warmup if half else plan.warmup,
                                    "steps": plan.bf16_steps if half else plan.steps})
    if plan.decode:
        for run in range(plan.runs):
            for fw in frameworks:
                out.append({**common, "kind": "decode", "section": "decode",
                            "config": plan.decode_config, "precision": plan.decode_precision,
                            "framework": fw, "run": run, "searches": plan.searches,
                            "decode_sentences": plan.decode_sentences,
                            "decode_batch": plan.decode_batch, "decode_length": plan.decode_length,
                            "sweep_sentences": plan.sweep_sentences,
                            "sweep_lengths": plan.sweep_lengths,
                            "sweep_repeats": plan.sweep_repeats})
    return out


def records_from(spec: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten one worker result into table records (train gives train + train-memory)."""
    base = {k: spec[k] for k in ("config", "precision", "framework", "run")}
    meta = {k: result[k] for k in ("torch", "transformers", "threads") if k in result}
    if spec["kind"] == "train":
        m = result["metrics"]
        return [{**base, "section": "train", "metrics": m, "step_times": result.get("step_times"),
                 **meta},
                {**base, "section": "train-memory", "metrics": {"peak_mem_mb": m.get("peak_mem_mb")},
                 **meta}]
    return [{**base, "section": section, "metrics": m, **meta}
            for section, m in result["sections"].items()]


def run_worker(spec: dict[str, Any], timeout: float | None, verbose: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if verbose and proc.stderr.strip():
        print(proc.stderr, file=sys.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"error": f"worker exited with status {proc.returncode}:\n{tail}"}


def prepare(data_dir: str, work_dir: str) -> None:
    """Tokenize and binarize Multi30k once (reused by every worker through the cache)."""
    from nmt.config import Config
    from nmt.data.prepare import prepare_data

    data_cfg, tok_cfg = _data_configs(data_dir)
    prepare_data(Config(run_dir=work_dir, data=data_cfg, tokenizer=tok_cfg),
                 log=lambda line: print(f"  | {line}", file=sys.stderr))


def _describe(spec: dict[str, Any]) -> str:
    what = f"{spec['kind']} {spec['config']} {spec['precision']}"
    return f"{what} {spec['framework']} run {spec['run'] + 1}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.report:
        with open(args.report) as f:
            records = [r for r in map(json.loads, filter(str.strip, f)) if r.get("kind") == "run"]
        print(format_table(summarize(records)))
        return 0
    plan = build_plan(args)
    problem = check_plan(plan)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if plan.peer:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_peer

        if bench_peer.import_transformers() is None:
            print("transformers is not installed: running without the peer "
                  "(pip install -e '.[bench]')", file=sys.stderr)
            plan.peer = False
    work_dir = args.work_dir or str(Path(tempfile.gettempdir()) / "nmt_bench")
    print(f"preparing data in {work_dir} ...", file=sys.stderr)
    prepare(args.data_dir, work_dir)
    threads = args.threads or len(os.sched_getaffinity(0))
    common = {"data_dir": args.data_dir, "work_dir": work_dir, "device": args.device,
              "threads": threads, "seed": 1, "batch_tokens": args.batch_tokens,
              "peak_tflops": args.peak_tflops, "peer_malloc_tuning": args.peer_malloc_tuning,
              "peer_engine": args.peer_engine, "ct2_compute_type": args.ct2_compute_type}
    if args.peer_engine == "ctranslate2" and plan.train:
        print("error: --peer-engine ctranslate2 only decodes: use it with --decode", file=sys.stderr)
        return 2
    specs = jobs(plan, common)
    out = open(args.out, "a") if args.out else None
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for i, spec in enumerate(specs, 1):
            print(f"[{i}/{len(specs)}] {_describe(spec)} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            result = run_worker(spec, args.job_timeout, args.verbose)
            if "error" in result:
                print(f"  failed: {result['error']}", file=sys.stderr)
                new = [{k: spec[k] for k in ("config", "precision", "framework", "run")}
                       | {"section": spec["section"], "error": result["error"]}]
            else:
                new = records_from(spec, result)
            print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            for record in new:
                record["kind"] = "run"
                records.append(record)
                line = json.dumps(record)
                print(line)
                if out:
                    out.write(line + "\n")
                    out.flush()
        rows = summarize(records)
        setup = {"quick": args.quick, "threads": threads, "device": args.device,
                 "batch_tokens": args.batch_tokens, "cpu_count": os.cpu_count(),
                 "peer_malloc_tuning": args.peer_malloc_tuning, "elapsed_s": time.perf_counter() - started,
                 **{k: v for k, v in asdict(plan).items()}}
        for row in rows:
            line = json.dumps({"kind": "summary", **asdict(row)})
            print(line)
            if out:
                out.write(line + "\n")
        if out:
            out.write(json.dumps({"kind": "setup", **setup}) + "\n")
    finally:
        if out:
            out.close()
    print()
    print(format_table(rows))
    failed = [r for r in records if r.get("error")]
    if failed:
        print(f"\n{len(failed)} worker(s) failed: " + ", ".join(
            f"{r['section']} {r['config']} {r['precision']} {r['framework']} run {r['run'] + 1}"
            for r in failed))
    print(f"\n{threads} torch threads; peer malloc: "
          + ("nmt's keep_freed_memory, like ours" if args.peer_malloc_tuning else
             "plain glibc (ours: nmt.runtime.keep_freed_memory, as `nmt train` does)"))
    if args.quick:
        print("(--quick: few steps and one run; the figures are a smoke test, not a measurement)")
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="run the training section (default: both)")
    p.add_argument("--decode", action="store_true", help="run the decoding section (default: both)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 run, 1+2 steps (bf16 1+1), 64 decode / 8 sweep sentences, 1 repeat")
    p.add_argument("--configs", default="tiny,small,base", help=f"model sizes: {', '.join(SIZES)}")
    p.add_argument("--precision", default="fp32,bf16", help="training precisions (fp32, bf16, fp16)")
    p.add_argument("--runs", type=int, default=None, help="alternating runs per framework (3; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (5; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (30; quick 2)")
    p.add_argument("--bf16-warmup", type=int, default=None, help="untimed steps in bf16/fp16 (quick 1)")
    p.add_argument("--bf16-steps", type=int, default=None, help="timed steps in bf16/fp16 (quick 1)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--decode-config", default="small")
    p.add_argument("--decode-precision", default="fp32")
    p.add_argument("--searches", default="greedy,beam5", help="greedy and/or beamK")
    p.add_argument("--decode-sentences", type=int, default=None, help="test sentences (500; quick 64)")
    p.add_argument("--decode-batch", type=int, default=64, help="sentences per decoding batch")
    p.add_argument("--decode-length", type=int, default=32, help="forced output length")
    p.add_argument("--sweep-lengths", default="16,64,256", help="forced lengths of the cost sweep")
    p.add_argument("--sweep-sentences", type=int, default=None, help="sentences in the sweep (64; quick 8)")
    p.add_argument("--sweep-repeats", type=int, default=None,
                   help="repeats per sweep length, median kept (3; quick 1)")
    p.add_argument("--no-peer", action="store_true", help="skip the Hugging Face peer")
    p.add_argument("--peer-malloc-tuning", action="store_true",
                   help="give the peer nmt's glibc malloc settings too (nmt.runtime.keep_freed_memory)")
    p.add_argument("--peer-engine", default="transformers", choices=["transformers", "ctranslate2"],
                   help="decoding peer: transformers generate() or CTranslate2 running our model "
                        "exported with nmt export (needs nmt[export])")
    p.add_argument("--ct2-compute-type", default="default", choices=["default", "float32", "int8"],
                   help="CTranslate2 weights at decode time (--peer-engine ctranslate2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = the usable cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of the device for MFU (default: known GPUs only)")
    p.add_argument("--data-dir", default=str((REPO / "../shared/data/multi30k").resolve()))
    p.add_argument("--work-dir", default=None, help="data cache and run folder (default: $TMPDIR/nmt_bench)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--report", default=None, metavar="FILE.jsonl",
                   help="only print the table of the runs recorded in FILE.jsonl (from --out)")
    p.add_argument("--job-timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
