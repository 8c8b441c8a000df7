"""The ``--synthetic N`` part of bench_data.py: a WMT-sized corpus, prepare and training memory."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BLOCK = 200_000  # pairs written at a time


def run_synthetic(args, record, summary) -> None:
    work = Path(args.work_dir or "bench_data_synthetic").resolve()
    multi30k = Path(args.data_dir)
    corpus = write_corpus(multi30k, work / f"corpus_{args.synthetic}", args.synthetic)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # a cold prepare
    common = [f"data.cache_dir={cache}", *args.overrides]
    results = []
    prepare = measure(["prepare", "-c", args.config, f"data.dir={corpus}", f"run_dir={work / 'run_prepare'}",
                       *common])
    results += [record("prepare_wall_s", prepare["wall_s"]),
                record("prepare_pairs_per_s", args.synthetic / prepare["wall_s"]),
                # CPU seconds of the whole tree: over 2 cores, a lower bound of the wall time on an idle machine
                record("prepare_cpu_s", prepare["cpu_s"]),
                record("prepare_peak_tree_rss_mb", prepare["peak_tree_rss_mb"]),
                record("prepare_peak_tree_pss_mb", prepare["peak_tree_pss_mb"]),
                record("prepare_peak_process_rss_mb", prepare["peak_process_rss_mb"])]
    if not args.no_train:
        for run in ("run_train", "run_multi30k"):  # fresh runs, not resumed ones
            shutil.rmtree(work / run, ignore_errors=True)
        train = [f"train.max_steps={args.train_steps}", "train.log_every=1", "train.valid_every=0",
                 f"train.save_every={args.train_steps}", "data.max_valid_sentences=8", "train.accum_steps=1"]
        wmt = measure(["train", "-c", args.config, f"data.dir={corpus}", f"run_dir={work / 'run_train'}",
                       *common, *train], watch_step=args.train_steps)
        small = measure(["train", "-c", args.config, f"data.dir={multi30k}", "data.train=train",
                         "data.valid=val", "data.test=test_2016_flickr", f"run_dir={work / 'run_multi30k'}",
                         *common, *train], watch_step=args.train_steps)
        results += [record("warm_start_to_training_s", wmt["first_step_s"]),
                    record("warm_start_to_step_1_logged_s", wmt["step_1_s"]),
                    record("train_rss_at_step_mb", wmt["rss_at_step_mb"]),
                    record("multi30k_train_rss_at_step_mb", small["rss_at_step_mb"]),
                    record("train_rss_minus_multi30k_mb", wmt["rss_at_step_mb"] - small["rss_at_step_mb"])]
    summary(results)


def write_corpus(multi30k: Path, out: Path, n: int) -> Path:
    """N pairs of two random Multi30k pairs joined; kept between runs (a stamp marks it complete)."""
    stamp = out / "complete"
    if stamp.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    src, tgt = (_lines(multi30k / f"train.{lang}.gz") for lang in ("en", "de"))
    rng = np.random.default_rng(0)
    with open(out / "train.en", "w", encoding="utf-8") as fs, open(out / "train.de", "w", encoding="utf-8") as ft:
        for start in range(0, n, BLOCK):
            pairs = rng.integers(0, len(src), size=(min(BLOCK, n - start), 2)).tolist()
            fs.write("".join(f"{src[a]} {src[b]}\n" for a, b in pairs))
            ft.write("".join(f"{tgt[a]} {tgt[b]}\n" for a, b in pairs))
    for split in ("val", "test_2016_flickr"):
        for lang in ("en", "de"):
            (out / f"{split}.{lang}").write_text("".join(s + "\n" for s in _lines(multi30k / f"{split}.{lang}.gz")),
                                                 encoding="utf-8")
    stamp.touch()
    return out


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def measure(nmt_args: list[str], watch_step: int = 0) -> dict[str, float]:
    """Run ``nmt ARGS``; wall time, the peak summed RSS of its process tree (sampled every 0.1 s),
    the peak RSS of its largest process, and with ``watch_step`` the time until the training loop
    starts and the trainer's peak RSS (VmHWM) when step ``watch_step`` is logged."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nmt.cli", *nmt_args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    peak = [0, 0]
    done = threading.Event()
    sampler = threading.Thread(target=_sample_tree, args=(proc.pid, peak, done), daemon=True)
    sampler.start()
    result: dict[str, float] = {}
    for line in proc.stdout:
        print(f"  | {line}", end="")
        if watch_step and line.startswith("effective batch"):  # logged as the training loop starts
            result["first_step_s"] = time.perf_counter() - start
        if watch_step and line.startswith("step"):
            result.setdefault("step_1_s", time.perf_counter() - start)  # includes the epoch plan
            if int(line.split()[1]) == watch_step:
                result["rss_at_step_mb"] = _status_kb(proc.pid, "VmHWM") / 1024
    rc = proc.wait()
    done.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"nmt {' '.join(nmt_args)} failed with status {rc}")
    import resource  # noqa: PLC0415

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # all waited-for descendants so far
    result.update(wall_s=time.perf_counter() - start, peak_tree_rss_mb=peak[0] / 1024,
                  peak_tree_pss_mb=peak[1] / 1024,
                  peak_process_rss_mb=usage.ru_maxrss / 1024, cpu_s=usage.ru_utime + usage.ru_stime)
    return result


def _sample_tree(root: int, peak: list[int], done: threading.Event) -> None:
    """peak[0]: summed RSS; peak[1]: summed PSS (shared pages split among their processes, so a
    child between fork and exec does not count its parent's memory twice)."""
    while not done.is_set():
        pids = _tree(root)
        peak[0] = max(peak[0], sum(_status_kb(pid, "VmRSS") for pid in pids))
        peak[1] = max(peak[1], sum(_pss_kb(pid) for pid in pids))
        time.sleep(0.1)


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    pids, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        pids += map(int, children)
        frontier += map(int, children)
    return pids


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
