"""scripts/gpu_check.sh --cpu-smoke: the GPU check's logic (speed table, Multi30k run) on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it


def test_gpu_check_cpu_smoke_writes_the_speed_table_and_a_bleu_row(tmp_path, small_corpus):
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--data", str(small_corpus),
         "--run-dir", str(tmp_path / "run"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    speed = [r for r in rows if r["kind"] == "speed"]
    assert {(r["precision"], r["compiled"]) for r in speed} == {(p, c) for p in ("bf16", "fp16") for c in (False, True)}
    assert all(r["tgt_tokens_per_s"] > 0 and r["mfu"] is None for r in speed)  # no peak known for a CPU
    bleu = [r for r in rows if r["kind"] == "multi30k"]
    assert len(bleu) == 1 and bleu[0]["test_bleu"] >= 0 and bleu[0]["last_step"] == 4
