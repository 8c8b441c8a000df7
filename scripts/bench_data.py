"""Benchmark the data pipeline: on Multi30k EN-DE (cold/warm prepare, batch throughput, padding),
or at WMT scale on a synthetic corpus (``--synthetic N``).

Usage: .venv/bin/python scripts/bench_data.py [--data-dir DIR] [--run-dir DIR] [--batch-tokens N]
       .venv/bin/python scripts/bench_data.py --synthetic N --work-dir DIR [--train-steps 20]
           [--no-train] [--config configs/wmt14_en_de.yaml] [override ...]
Prints one JSON object per measurement, then a readable summary.

``--synthetic N`` writes N training pairs made of Multi30k sentence pairs joined two at a time in
random order (so sentences are about as long as WMT's; Multi30k's validation and test splits are
copied), then runs ``nmt prepare`` on it in a fresh cache, sampling the RSS of its process tree,
and ``nmt train`` for a few steps in a new run_dir on that cache and on Multi30k itself, with the
same model and tokenizer settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from nmt.config import Config, DataConfig, TokenizerConfig
from nmt.data.batching import TokenBatchSampler, collate
from nmt.data.prepare import prepare_data
from nmt.data.store import ParallelData

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    args = _parse_args()
    if args.synthetic:
        from bench_data_scale import run_synthetic  # noqa: PLC0415

        run_synthetic(args, _record, _summary)
        return
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench_data_"))
    shutil.rmtree(run_dir / "data", ignore_errors=True)
    cfg = Config(run_dir=str(run_dir),
                 data=DataConfig(dir=args.data_dir),
                 tokenizer=TokenizerConfig(vocab_size=8000, model_type="bpe", joint=True))
    results = []
    for name in ("prepare_cold_s", "prepare_warm_s"):
        start = time.perf_counter()
        data = prepare_data(cfg, log=lambda line: print(f"  | {line}"))
        results.append(_record(name, time.perf_counter() - start))
    results += _bench_batches(data.train, args.batch_tokens)
    _summary(results)
    if not args.run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


def _summary(results: list[dict]) -> None:
    for r in results:
        print(json.dumps(r))
    for r in results:
        print(f"{r['metric']:>28}: {r['value']:12.3f}")


def _bench_batches(train: ParallelData, batch_tokens: int) -> list[dict]:
    start = time.perf_counter()
    sampler = TokenBatchSampler(train.src.lengths(), train.tgt.lengths(), batch_tokens, seed=1)
    batches = sampler.epoch_batches(0)
    plan_s = time.perf_counter() - start
    real = padded = 0
    start = time.perf_counter()
    for indices in batches:
        batch = collate(train, indices)
        real += batch.n_src_tokens + batch.n_tgt_tokens
        padded += batch.padded_tokens
    collate_s = time.perf_counter() - start
    return [
        _record("epoch_plan_s", plan_s),
        _record("batches_per_s", len(batches) / collate_s),
        _record("batches_per_s_incl_plan", len(batches) / (collate_s + plan_s)),
        _record("batches_per_epoch", len(batches)),
        _record("padding_efficiency", real / padded),
    ]


def _record(metric: str, value: float) -> dict:
    """One measurement, as a JSON-ready dict."""
    return {"metric": metric, "value": round(value, 4)}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str((REPO / "../shared/data/multi30k").resolve()))
    parser.add_argument("--run-dir", default=None, help="keep the cache here (default: temp dir)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="write a synthetic WMT-like corpus of N pairs and measure it at scale")
    parser.add_argument("--work-dir", default=None, help="--synthetic: corpus, cache and runs go here")
    parser.add_argument("--config", default=str(REPO / "configs/wmt14_en_de.yaml"))
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--no-train", action="store_true", help="--synthetic: measure prepare only")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_args()


if __name__ == "__main__":
    main()
