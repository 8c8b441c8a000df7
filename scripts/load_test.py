"""Load test of `nmt serve`: N concurrent LibreTranslate clients for a bounded time, on loopback only.

Usage (from the repository root; needs ``pip install -e '.[serve,dev]'``)::

    # start a server per setting and compare dynamic batching with one request at a time
    .venv/bin/python scripts/load_test.py -m CKPT --clients 64 --duration 60 --compare
    # against a running server
    .venv/bin/python scripts/load_test.py --url http://127.0.0.1:5000 --clients 64 --duration 60

Each client sends one sentence per request (the next line of ``--sentences``, default Multi30k
test_2016_flickr.en) and waits for the answer before sending the next. Printed as one JSON line
per run: requests, failed (any status but 200, or a transport error), sentences/s, and latency p50 /
p99 in ms. ``--max-requests`` bounds the total whatever the duration.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SENTENCES = ROOT.parent / "shared" / "data" / "multi30k" / "test_2016_flickr.en.gz"


def read_sentences(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        sys.exit(f"error: the load test only targets loopback addresses, not {host}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run_load(url: str, sentences: list[str], clients: int, duration: float,
                   max_requests: int, source: str = "en", target: str = "de") -> dict:
    """Drive ``clients`` concurrent clients for ``duration`` s (or ``max_requests`` in all)."""
    import httpx

    check_loopback(url)
    latencies: list[float] = []
    failed = 0
    sent = 0
    stop = time.perf_counter() + duration

    async def client(k: int, http) -> None:
        nonlocal failed, sent
        i = k
        while time.perf_counter() < stop and sent < max_requests:
            sent += 1
            body = {"q": sentences[i % len(sentences)], "source": source, "target": target}
            i += clients
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/translate", json=body)
                ok = response.status_code == 200 and "translatedText" in response.json()
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                failed += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        elapsed = time.perf_counter() - began
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies) + failed,
            "failed": failed, "sentences_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(1000 * percentile(latencies, 0.50), 1),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 1)}


def start_server(model: str, max_batch: int, threads: int, queue_size: int) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nmt.cli", "serve", "-m", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--threads", str(threads),
                             "--queue-size", str(queue_size)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    sys.exit("error: the server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (loopback only)")
    target.add_argument("-m", "--model", help="start `nmt serve -m MODEL` on 127.0.0.1 for the run")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    p.add_argument("--max-requests", type=int, default=100_000, help="upper bound per run")
    p.add_argument("--sentences", type=Path, default=DEFAULT_SENTENCES)
    p.add_argument("--max-batch", type=int, default=64, help="the started server's --max-batch")
    p.add_argument("--compare", action="store_true",
                   help="with -m: run with --max-batch as given, then with --max-batch 1")
    p.add_argument("--threads", type=int, default=0, help="the started server's --threads")
    args = p.parse_args()
    sentences = read_sentences(args.sentences)
    settings = [args.max_batch, 1] if args.compare else [args.max_batch]
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}
    results = []
    for max_batch in settings if args.model else [None]:
        proc, url = (start_server(args.model, max_batch, args.threads, queue_size=4 * args.clients)
                     if args.model else (None, args.url))
        try:
            result = asyncio.run(run_load(url, sentences, args.clients, args.duration, args.max_requests))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
        result.update(max_batch=max_batch, **machine)
        results.append(result)
        print(json.dumps(result), flush=True)
    if len(results) == 2 and results[1]["sentences_per_s"]:
        ratio = results[0]["sentences_per_s"] / results[1]["sentences_per_s"]
        print(f"dynamic batching: {ratio:.2f}x the sentences/s of one request at a time")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
