"""The logic of scripts/gpu_check.sh: speed table, then a Multi30k run in the time that is left.

Every result is printed and appended to ``--out`` as one JSON object per line. MFU counts model
FLOPs only (matmuls of the forward and backward: 6 per parameter per target token on the weights,
plus the attention score and value products), over the GPU's dense peak for the precision.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"torch": "everything", "numpy": "everything", "yaml": "configs (pyyaml)",
          "sentencepiece": "the Multi30k run (tokenizer)", "sacrebleu": "the Multi30k run (BLEU)",
          "tqdm": "the Multi30k run (progress)"}
# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name: from the vendors' data sheets.
PEAKS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100": 756e12, "A100": 312e12}


def missing_packages() -> list[str]:
    out = []
    for name, what in NEEDED.items():
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(f"missing package {name}: stops {what}")
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
    net = torch.compile(objective, dynamic=True, backend="aot_eager" if smoke else "inductor") if compiled else objective
    optimizer = build_optimizer(model, TrainConfig())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    while True:
        rows = tokens // length
        src = torch.randint(4, vocab, (rows, length), device=device)
        tgt = torch.randint(4, vocab, (rows, length), device=device)
        positions = torch.arange(rows * length, device=device)
        try:
            return _time_steps(net, model, optimizer, scaler, src, tgt, positions, precision, compiled,
                               args, device, cfg, vocab, length, AUTOCAST_DTYPES)
        except torch.cuda.OutOfMemoryError:
            tokens //= 2
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


def _time_steps(net, model, optimizer, scaler, src, tgt, positions, precision, compiled, args, device, cfg,
                vocab, length, dtypes) -> dict:
    import torch

    def step():
        optimizer.zero_grad(set_to_none=True)
        grad_scale = scaler.scale(torch.full((), 1.0 / positions.numel(), device=device))
        with torch.autocast(device.type, dtype=dtypes[precision]):
            loss, _ = net(src, tgt, positions, tgt.reshape(-1), grad_scale)
        (loss * grad_scale).backward()
        scaler.step(optimizer)
        scaler.update()

    warmup, timed = (1, 2) if args.cpu_smoke else (5, 20)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tok_s = timed * positions.numel() / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    flops = model_flops_per_token(cfg, vocab, length, length) * tok_s
    return {"kind": "speed", "device": name, "model": "tiny" if args.cpu_smoke else "base",
            "precision": precision, "compiled": compiled, "batch_tgt_tokens": positions.numel(),
            "tgt_tokens_per_s": round(tok_s), "tflops": round(flops / 1e12, 2),
            "mfu": round(flops / peak, 3) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else None}


def nmt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "nmt.cli", *args], cwd=ROOT, check=True)


def multi30k_row(args, minutes_left: float) -> dict:
    """prepare, train (within the time left), average, evaluate: the test BLEU row."""
    if args.cpu_smoke:
        config, extra = "configs/tiny.yaml", ["train.max_steps=4", "train.valid_every=0", "train.save_every=2",
                                               "train.keep_last=2", "train.device=cpu", "data.max_valid_sentences=4"]
    else:
        config, extra = "configs/multi30k_en_de_gpu.yaml", [f"train.max_time_minutes={minutes_left:.2f}"]
    run_dir = Path(args.run_dir)
    over = [f"data.dir={args.data}", f"run_dir={run_dir}", *extra]
    nmt("prepare", "-c", config, *over)
    nmt("train", "-c", config, *over)
    averaged = run_dir / "checkpoints" / "averaged.pt"
    nmt("average", "-o", str(averaged), "--last", "2" if args.cpu_smoke else "5", str(run_dir))
    scores = run_dir / "test_scores.json"
    with open(scores, "w") as f:
        subprocess.run([sys.executable, "-m", "nmt.cli", "evaluate", "-c", config, *over, "-m", str(averaged)],
                       cwd=ROOT, check=True, stdout=f)
    result = json.loads(scores.read_text())
    steps = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1]).get("step")
    return {"kind": "multi30k", "config": config, "test_bleu": round(result["bleu"], 2),
            "signature": result["signature"]["bleu"], "last_step": steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="folder with {train,val,test_2016_flickr}.{en,de}[.gz]")
    p.add_argument("--out", type=Path, help="append the JSON lines here too")
    p.add_argument("--minutes", type=float, default=9.0, help="total budget (default 9)")
    p.add_argument("--batch-tokens", type=int, default=25_000, help="target tokens per speed batch")
    p.add_argument("--run-dir", default="runs/gpu_check")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: the script's logic only")
    args = p.parse_args()
    start = time.monotonic()
    problems = missing_packages()
    for line in problems:
        print(line, file=sys.stderr)
    if any("everything" in line for line in problems):
        return 2
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False); --cpu-smoke runs on the CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    for compiled in (False, True):
        for precision in ("bf16", "fp16"):
            emit(speed_row(precision, compiled, args, device), args.out)
    if problems:
        return 2
    # the evaluation after training takes about a minute on a GPU: keep it out of the training budget
    left = args.minutes - (time.monotonic() - start) / 60 - 1.5
    emit(multi30k_row(args, max(left, 0.5)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
