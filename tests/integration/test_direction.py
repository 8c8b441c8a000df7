"""Reversing the translation direction is one override: data.src_lang=de data.tgt_lang=en."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.integration.conftest import nmt

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it

REVERSE = ("data.src_lang=de", "data.tgt_lang=en")


def _token_counts(stdout: str) -> dict[str, tuple[int, int]]:
    """{split: (src tokens, tgt tokens)} from the statistics `nmt prepare` prints."""
    found = re.findall(r"^(\w+): \d+ pairs, (\d+) src / (\d+) tgt tokens\b", stdout, flags=re.M)
    return {split: (int(src), int(tgt)) for split, src, tgt in found}


def test_reverse_override_swaps_the_sides(tmp_path, small_corpus):
    # Separate SentencePiece models: each language's model is the same in both directions.
    common = ("-c", "configs/tiny.yaml", f"data.dir={small_corpus}", "tokenizer.joint=false",
              "model.tie_embeddings=false")
    forward = nmt("prepare", *common, f"run_dir={tmp_path / 'en_de'}")
    reverse = nmt("prepare", *common, f"run_dir={tmp_path / 'de_en'}", *REVERSE)
    assert forward.returncode == 0 and reverse.returncode == 0, forward.stderr + reverse.stderr
    fwd, rev = _token_counts(forward.stdout), _token_counts(reverse.stdout)
    assert set(fwd) == {"train", "valid", "test"}
    assert all(fwd[split][0] != fwd[split][1] for split in fwd)  # the check below can tell
    assert {split: counts[::-1] for split, counts in fwd.items()} == rev


def test_reverse_direction_trains_and_evaluates_into_english(tmp_path, small_corpus):
    run = tmp_path / "de_en"
    args = ("-c", "configs/tiny.yaml", f"run_dir={run}", f"data.dir={small_corpus}", *REVERSE)
    trained = nmt("train", *args, "train.max_steps=4", "train.valid_every=0")
    assert trained.returncode == 0, trained.stderr
    saved = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert (saved["config"]["data"]["src_lang"], saved["config"]["data"]["tgt_lang"]) == ("de", "en")
    hyp = tmp_path / "test.hyp"
    scored = nmt("evaluate", *args, "-m", str(run / "checkpoints" / "last.pt"), "--out", str(hyp))
    assert scored.returncode == 0, scored.stderr
    assert "bleu" in json.loads(scored.stdout)
    assert len(hyp.read_text(encoding="utf-8").splitlines()) == 40  # the test split of small_corpus
