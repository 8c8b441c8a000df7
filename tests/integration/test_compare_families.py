"""scripts/compare_families.sh end to end on the tiny config and the synthetic corpus: five arms
trained, averaged, evaluated and tabulated."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmt.tokenizer import Tokenizer
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.slow  # trains six tiny models


def test_the_script_prints_a_row_of_numbers_per_arm_and_three_samples(small_corpus, tmp_path):
    nmt = tmp_path / "nmt"
    nmt.write_text(f'#!/bin/sh\nexec {sys.executable} -m nmt.cli "$@"\n')
    nmt.chmod(0o755)
    env = {**os.environ, "CONFIG": "configs/tiny.yaml", "OUT": str(tmp_path / "families"), "DATA": str(small_corpus),
           "NMT": str(nmt), "PY": sys.executable, "DECODER_ONLY_LAYERS": "3", "KEEP_BEST": "2"}
    # steps, not minutes, end each run: 10 steps, validated and saved every 5
    smoke = ["train.max_steps=10", "train.valid_every=5", "train.save_every=5", "data.max_valid_sentences=8",
             "train.log_every=5"]
    result = subprocess.run(["scripts/compare_families.sh", "1", *smoke], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in result.stdout.splitlines() if re.match(r"\| [A-E] \|", line)}
    assert sorted(rows) == list("ABCDE"), result.stdout[-3000:]
    number = r"[\d,]+(\.\d+)?"
    for arm in "ABCD":
        parameters, updates, val, bleu, chrf, speed = rows[arm]
        assert re.fullmatch(number + r"( \(not within 10% of A\))?", parameters), rows[arm]
        assert all(re.fullmatch(number, x) for x in (val, bleu, chrf, speed)), rows[arm]
        assert float(speed) > 0 and float(chrf) > 0
    assert rows["D"][1] == "10 + 10" and rows["A"][1] == "10"
    assert rows["A"][0] == rows["D"][0]  # the same translator, pre-trained or not
    assert re.fullmatch(r"ppl \d+\.\d+", rows["E"][2]) and rows["E"][1] == "10"
    samples = result.stdout.split("Samples of E")[1].splitlines()
    assert len([line for line in samples if line.startswith("- ")]) == 3
    assert "text: pair" in (tmp_path / "families" / "D_mlm" / "config.yaml").read_text()
    # D translates with the masked LM's vocabulary: it segments German as A's joint tokenizer does
    german = (small_corpus / "val.de").read_text(encoding="utf-8").splitlines()
    pieces = {arm: sum(map(len, _tokenizer(tmp_path / "families" / arm).encode_tgt(german))) for arm in "AD"}
    assert pieces["D"] <= 1.05 * pieces["A"], pieces


def _tokenizer(run: Path) -> Tokenizer:
    return Tokenizer.from_state(torch.load(run / "checkpoints" / "averaged.pt", weights_only=True)["tokenizer"])
