"""The logic of scripts/gpu_check.sh: speed table, then a Multi30k run in the time that is left.

Every result is printed and appended to ``--out`` as one JSON object per line. MFU counts model
FLOPs only (matmuls of the forward and backward: 6 per parameter per target token on the weights,
plus the attention score and value products), over the GPU's dense peak for the precision.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> package. All are needed before the first row: the speed rows import nmt.config
# (pyyaml) and nmt.loss (sentencepiece through the tokenizer).
NEEDED = {"torch": "torch", "numpy": "numpy", "yaml": "pyyaml", "sentencepiece": "sentencepiece",
          "sacrebleu": "sacrebleu", "tqdm": "tqdm"}
# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name: from the vendors' data sheets.
PEAKS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100": 756e12, "A100": 312e12}


def missing_packages() -> list[str]:
    out = []
    for name, package in NEEDED.items():
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(f"missing package {package}")
    return out


def emit(row: dict, out: Path | None) -> None:
    print(json.dumps(row), flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def model_flops_per_token(cfg, vocab: int, src_len: int, tgt_len: int) -> float:
    """Forward + backward (3x forward) matmul FLOPs per target token, source about as long."""
    d, f = cfg.d_model, cfg.d_ff
    enc = cfg.encoder_layers * (4 * d * d + 2 * d * f)
    dec = cfg.decoder_layers * (8 * d * d + 2 * d * f)
    weights = 2 * (enc + dec + d * vocab)  # forward: 2 FLOPs per weight per token
    attention = 2 * 2 * d * (cfg.encoder_layers * src_len + cfg.decoder_layers * (tgt_len / 2 + src_len))
    return 3 * (weights + attention)


def speed_row(precision: str, compiled: bool, args, device) -> dict:
    import torch

    from nmt.config import ModelConfig, TrainConfig
    from nmt.loss import Objective
    from nmt.model import build_model
    from nmt.optim import build_optimizer
    from nmt.runtime import AUTOCAST_DTYPES, configure_math

    smoke = args.cpu_smoke
    cfg = (ModelConfig(encoder_layers=2, decoder_layers=2, d_model=64, heads=4, d_ff=128) if smoke else
           ModelConfig(encoder_layers=6, decoder_layers=6, d_model=512, heads=8, d_ff=2048))
    vocab, length = (256, 16) if smoke else (32000, 32)
    tokens = 512 if smoke else args.batch_tokens
    configure_math(device, precision)
    torch.manual_seed(0)
    model = build_model(cfg, vocab, vocab).to(device)
    objective = Objective(model, 0.1)
    # the smoke checks this script's logic: Dynamo's eager backend captures and counts graphs (a recompilation
    # per shape shows) without compile time; the compiled objective itself is tested in tests/unit/test_loss.py
    net = torch.compile(objective, dynamic=True, backend="eager" if smoke else "inductor") if compiled else objective
    optimizer = build_optimizer(model, TrainConfig())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    while True:
        batches = _batches(tokens, length, vocab, device)
        try:
            return _time_steps(net, model, optimizer, scaler, batches, precision, compiled,
                               args, device, cfg, vocab, length, AUTOCAST_DTYPES)
        except torch.cuda.OutOfMemoryError:
            tokens //= 2
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


def _batches(tokens: int, length: int, vocab: int, device) -> list[tuple]:
    """(src [B, S], tgt [B, T], positions [N]) of about ``tokens`` targets each, every one of another
    shape, as training sees them: a compiled step that recompiled per shape would show it in the time."""
    import torch

    out = []
    for i, scale in enumerate((1.0, 0.75, 1.25, 0.875, 1.125)):
        t = max(2, round(length * scale))
        rows = max(1, tokens // t)
        src = torch.randint(4, vocab, (rows, t + i), device=device)
        tgt = torch.randint(4, vocab, (rows, t), device=device)
        positions = torch.arange(rows * t - i, device=device)  # the last i targets are padding
        out.append((src, tgt, positions))
    return out


def _time_steps(net, model, optimizer, scaler, batches, precision, compiled, args, device, cfg,
                vocab, length, dtypes) -> dict:
    import torch
    from torch._dynamo.utils import counters

    def step(src, tgt, positions):
        optimizer.zero_grad(set_to_none=True)
        grad_scale = scaler.scale(torch.full((), 1.0 / positions.numel(), device=device))
        with torch.autocast(device.type, dtype=dtypes[precision]):
            loss, _ = net(src, tgt, positions, tgt.reshape(-1)[positions], grad_scale)
        (loss * grad_scale).backward()
        scaler.step(optimizer)
        scaler.update()

    warmup, timed = (1, 2 * len(batches)) if args.cpu_smoke else (5, 4 * len(batches))
    torch._dynamo.reset()
    counters.clear()
    for _ in range(warmup):  # one shape: the compilation every run needs
        step(*batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = 0
    for i in range(timed):  # every shape in turn: any recompilation is in the time
        step(*batches[i % len(batches)])
        tokens += batches[i % len(batches)][2].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tok_s = tokens / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    flops = model_flops_per_token(cfg, vocab, length, length) * tok_s
    return {"kind": "speed", "device": name, "model": "tiny" if args.cpu_smoke else "base",
            "precision": precision, "compiled": compiled, "batch_tgt_tokens": tokens // timed,
            "shapes": len(batches), "graphs": counters["stats"]["unique_graphs"] if compiled else None,
            "tgt_tokens_per_s": round(tok_s), "tflops": round(flops / 1e12, 2),
            "mfu": round(flops / peak, 3) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else None}


class Budget:
    """The script's wall-clock deadline: ``--minutes`` from ``started`` (a time.time() value; gpu_check.sh
    passes its own start, so the package check, any offline install and start-up count too)."""

    def __init__(self, minutes: float, started: float) -> None:
        self.deadline = started + 60 * minutes - EXIT_MARGIN_S

    def left(self) -> float:
        """Seconds left (may be negative)."""
        return self.deadline - time.time()


class OutOfTime(Exception):
    """A stage of the Multi30k run was stopped at the deadline."""


# Time kept back from the Multi30k training budget for what follows the last step within the deadline:
# the final validation (beam search over the validation split on the GPU recipe) and save, averaging,
# and the test-set evaluation; the train command's start-up (data, model, CUDA) is measured around it.
FINISH_RESERVE_S = {"gpu": 150.0, "smoke": 20.0}
EXIT_MARGIN_S = 10.0
"""Kept back from --minutes for stopping a command at the deadline and the interpreter's exit."""
SPEED_SHARE = 0.4
"""Speed rows start only while less than this share of the budget is spent: the rest is Multi30k's."""


def nmt(budget: Budget, *args: str, stdout=None) -> None:
    """Run one ``nmt`` command, stopped at the deadline."""
    try:
        subprocess.run([sys.executable, "-m", "nmt.cli", *args], cwd=ROOT, check=True, stdout=stdout,
                       timeout=max(budget.left(), 1.0))
    except subprocess.TimeoutExpired:
        raise OutOfTime(f"nmt {args[0]} stopped at the deadline") from None


def fresh_run_dir(parent: Path) -> Path:
    """A new, empty folder under ``parent`` for this call: a second check never resumes the first."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no fresh run folder under {parent}")


def multi30k_row(args, run_dir: Path, budget: Budget) -> dict:
    """prepare, train (in the time left less the reserve), average, evaluate: the test BLEU row."""
    if args.cpu_smoke:
        config, extra = "configs/tiny.yaml", ["train.max_steps=4", "train.valid_every=0", "train.save_every=2",
                                               "train.keep_last=2", "train.device=cpu", "data.max_valid_sentences=4"]
    else:
        config, extra = "configs/multi30k_en_de_gpu.yaml", []
    row = {"kind": "multi30k", "config": config, "run_dir": str(run_dir)}
    over = [f"data.dir={args.data}", f"run_dir={run_dir}", *extra]
    try:
        nmt(budget, "prepare", "-c", config, *over)
        train_s = budget.left() - FINISH_RESERVE_S["smoke" if args.cpu_smoke else "gpu"]
        if train_s < 5:
            raise OutOfTime(f"{budget.left():.0f} s left after data preparation: no time to train")
        nmt(budget, "train", "-c", config, *over, f"train.max_time_minutes={train_s / 60:.3f}")
        averaged = run_dir / "checkpoints" / "averaged.pt"
        nmt(budget, "average", "-o", str(averaged), "--last", "2" if args.cpu_smoke else "5", str(run_dir))
        scores = run_dir / "test_scores.json"
        with open(scores, "w") as f:
            nmt(budget, "evaluate", "-c", config, *over, "-m", str(averaged), stdout=f)
    except (OutOfTime, subprocess.CalledProcessError) as e:
        return {**row, "error": str(e)}
    result = json.loads(scores.read_text())
    steps = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1]).get("step")
    return {**row, "test_bleu": round(result["bleu"], 2), "signature": result["signature"]["bleu"],
            "last_step": steps}


def speed_rows(args, device, budget: Budget, out: Path | None) -> None:
    """The four speed rows; a failing one (a compiler missing for torch.compile) is an error row."""
    for compiled in (False, True):
        for precision in ("bf16", "fp16"):
            row = {"kind": "speed", "precision": precision, "compiled": compiled}
            if budget.left() < (1 - SPEED_SHARE) * 60 * args.minutes:
                emit({**row, "error": "skipped: the rest of the budget is the Multi30k run's"}, out)
                continue
            try:
                emit(speed_row(precision, compiled, args, device), out)
            except Exception as e:  # noqa: BLE001 - any compiler or driver failure: report it, go on
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                emit({**row, "error": f"{type(e).__name__}: {first}"[:500]}, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="folder with {train,val,test_2016_flickr}.{en,de}[.gz]")
    p.add_argument("--out", type=Path, help="append the JSON lines here too")
    p.add_argument("--minutes", type=float, default=9.0, help="total budget, everything included (default 9)")
    p.add_argument("--batch-tokens", type=int, default=25_000, help="target tokens per speed batch")
    p.add_argument("--run-dir", type=Path, default=Path("runs/gpu_check"),
                   help="each call trains in a new folder under this one")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: the script's logic only")
    args = p.parse_args()
    budget = Budget(args.minutes, float(os.environ.get("GPU_CHECK_STARTED") or time.time()))
    problems = missing_packages()
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("error: install the packages first (scripts/gpu_check.sh installs them from wheels/ "
              "when that folder is there: make wheels)", file=sys.stderr)
        return 2
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False); --cpu-smoke runs on the CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    run_dir = fresh_run_dir(args.run_dir)
    speed_rows(args, device, budget, args.out)
    row = multi30k_row(args, run_dir, budget)
    emit(row, args.out)
    return 1 if "error" in row else 0


if __name__ == "__main__":
    sys.exit(main())
