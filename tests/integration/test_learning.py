"""A tiny model learns the synthetic test corpus: validation BLEU and chrF rise as it trains."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import nmt

pytestmark = pytest.mark.slow


def test_validation_bleu_and_chrf_rise_on_the_test_corpus(tmp_path, small_corpus):
    run = tmp_path / "run"
    result = nmt("train", "-c", "configs/tiny.yaml", f"run_dir={run}", f"data.dir={small_corpus}",
                 "train.max_steps=150", "train.valid_every=50", "train.save_every=150", "train.log_every=50",
                 "train.batch_tokens=2048", "train.warmup_steps=50", "train.clip_norm=1.0", "train.threads=1",
                 "model.dropout=0.0", "model.norm_first=true")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "valid_bleu" in r]
    assert [r["step"] for r in valid] == [50, 100, 150]
    first, last = valid[0], valid[-1]
    # on this machine: BLEU 0.1 -> 1.5, chrF 6 -> 28 (the corpus's agreement rules take longer)
    assert last["valid_bleu"] > first["valid_bleu"] + 0.5
    assert last["valid_chrf"] > first["valid_chrf"] + 10
    assert last["valid_loss"] < first["valid_loss"] - 1
