"""scripts/gpu_check.sh --cpu-smoke: the GPU check's logic (speed table, Multi30k run) on a tiny model."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it


def _gpu_check(*args: str, python: str = sys.executable, env: dict | None = None, timeout: float = 400):
    env = {**os.environ, "PYTHON": python, **(env or {})}
    env.pop("GPU_CHECK_STARTED", None)
    return subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_gpu_check_cpu_smoke_writes_the_speed_table_and_a_bleu_row(tmp_path, small_corpus):
    out = tmp_path / "results.jsonl"
    result = _gpu_check("--data", str(small_corpus), "--run-dir", str(tmp_path / "run"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    speed = [r for r in rows if r["kind"] == "speed"]
    assert {(r["precision"], r["compiled"]) for r in speed} == {(p, c) for p in ("bf16", "fp16") for c in (False, True)}
    assert all(r["tgt_tokens_per_s"] > 0 and r["mfu"] is None and r["shapes"] == 5 for r in speed)  # no CPU peak
    # compiled on five batch shapes: at most one graph more than the first (a recompilation per shape was 5)
    assert all(r["graphs"] <= 2 for r in speed if r["compiled"]), speed
    bleu = [r for r in rows if r["kind"] == "multi30k"]
    assert len(bleu) == 1 and bleu[0]["test_bleu"] >= 0 and bleu[0]["last_step"] == 4
    assert Path(bleu[0]["run_dir"]).parent == tmp_path / "run"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_call_trains_in_a_fresh_run_folder(tmp_path):
    fresh_run_dir = _load_script().fresh_run_dir
    first = fresh_run_dir(tmp_path / "runs")
    (first / "checkpoints").mkdir()  # what the first check left
    second = fresh_run_dir(tmp_path / "runs")
    assert first != second and first.parent == second.parent == tmp_path / "runs"
    assert list(second.iterdir()) == []


def _torch_only_venv(path: Path) -> Path:
    """A venv whose site-packages holds torch and its own dependencies (linked from this one), pip."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    todo, seen = ["torch"], set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency this build does without
        if name in seen:
            continue
        seen.add(name)
        for req in map(Requirement, dist.requires or []):
            if not req.marker or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        here = Path(sysconfig.get_path("purelib"))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if (here / top).exists() and not (site / top).exists():
                (site / top).symlink_to(here / top)
    assert "torch" in seen and not seen & {"numpy", "pyyaml", "sentencepiece", "sacrebleu", "tqdm"}, seen
    return python


def test_gpu_check_installs_offline_into_a_torch_only_python_and_survives_a_failing_compile(tmp_path, small_corpus):
    # Python X.Y wheels from PyPI, kept in the ignored wheels/pyX.Y once downloaded (make wheels).
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    subprocess.run(["make", "-s", "wheels", f"PYVER={version}", f"PYTHON={sys.executable}"], cwd=ROOT, check=True,
                   capture_output=True)
    python = _torch_only_venv(tmp_path / "venv")
    bare = subprocess.run([str(python), "-c", "import torch, yaml"], capture_output=True, text=True)
    assert bare.returncode != 0 and "yaml" in bare.stderr  # really only torch
    # a torch.compile that fails as it does without a C compiler or Triton: error rows, the run goes on
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import torch\n\n\ndef _compile(*args, **kwargs):\n    def fail(*a, **k):\n"
        "        raise RuntimeError('injected: no working C compiler')\n    return fail\n\n\n"
        "torch.compile = _compile\n")
    out = tmp_path / "results.jsonl"
    result = _gpu_check("--data", str(small_corpus), "--run-dir", str(tmp_path / "run"), "--out", str(out),
                        python=str(python), env={"GPU_CHECK_SITE": str(tmp_path / "site"),
                                                 "PYTHONPATH": f"{inject}:{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installing" in result.stderr and "offline" in result.stderr, result.stderr[-3000:]
    rows = _rows(out)
    compiled = [r for r in rows if r["kind"] == "speed" and r["compiled"]]
    assert len(compiled) == 2 and all("injected: no working C compiler" in r["error"] for r in compiled), compiled
    multi30k = [r for r in rows if r["kind"] == "multi30k"]
    assert len(multi30k) == 1 and multi30k[0]["test_bleu"] >= 0, rows


def test_gpu_check_ends_within_its_minutes_whatever_is_left_to_do(tmp_path, small_corpus):
    # 40 s: the first speed row, data preparation, training and evaluation do not all fit; the
    # script still ends in time, saying what it skipped or stopped.
    out, minutes = tmp_path / "results.jsonl", 40 / 60
    start = time.monotonic()
    result = _gpu_check("--data", str(small_corpus), "--run-dir", str(tmp_path / "run"), "--out", str(out),
                        "--minutes", f"{minutes:.4f}")
    elapsed = time.monotonic() - start
    assert elapsed <= 60 * minutes, (elapsed, result.stderr[-3000:])
    rows = _rows(out)
    assert any("skipped" in r.get("error", "") for r in rows if r["kind"] == "speed"), rows
    multi30k = [r for r in rows if r["kind"] == "multi30k"]
    assert len(multi30k) == 1 and result.returncode == (1 if "error" in multi30k[0] else 0), rows
