"""Masked-LM pre-training (task mlm) through the command line: a tiny BERT-style encoder trains on
the English side of the synthetic corpus and resumes exactly, fill-mask queries it, and its encoder
initialises a translator (train.init_from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import nmt

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it


def _args(run: Path, corpus: Path, steps: int) -> list[str]:
    return ["train", "-c", "configs/tiny.yaml", f"run_dir={run}", f"data.dir={corpus}", f"train.max_steps={steps}",
            "task=mlm", "model.arch=encoder_only", "data.lang=en", "train.log_every=1", "train.valid_every=15",
            "train.save_every=15", "train.batch_tokens=512", "train.label_smoothing=0"]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, small_corpus) -> Path:
    run = tmp_path_factory.mktemp("mlm") / "run"
    result = nmt(*_args(run, small_corpus, 60))
    assert result.returncode == 0, result.stderr
    return run


def test_trains_logs_rising_masked_token_accuracy_and_resumes_exactly(mlm_run, small_corpus, tmp_path):
    valid = [r for r in _records(mlm_run) if "valid_loss" in r]
    assert [r["step"] for r in valid] == [15, 30, 45, 60]
    assert not any("valid_bleu" in r for r in valid)
    accuracy = [r["valid_accuracy"] for r in valid]
    assert accuracy[-1] > accuracy[0] + 3, accuracy
    assert valid[-1]["valid_ppl"] < valid[0]["valid_ppl"]
    saved = torch.load(mlm_run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["config"]["task"] == "mlm" and saved["config"]["model"]["arch"] == "encoder_only"
    assert not any(k.startswith("decoder.") for k in saved["model"])
    run = tmp_path / "resumed"
    assert nmt(*_args(run, small_corpus, 30)).returncode == 0
    result = nmt(*_args(run, small_corpus, 60))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "| accuracy " in result.stdout
    straight = {r["step"]: r for r in _records(mlm_run) if "loss" in r}
    resumed = {r["step"]: r for r in _records(run) if "loss" in r}
    for step in range(31, 61):  # the masks too are drawn as in the uninterrupted run
        assert straight[step]["loss"] == pytest.approx(resumed[step]["loss"], abs=1e-6), step
    weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved["model"][k], weights[k]) for k in weights)


def test_fill_mask_prints_top_k_fillers_per_mask(mlm_run):
    ckpt = str(mlm_run / "checkpoints" / "best.pt")
    result = nmt("fill-mask", "-m", ckpt, "a man <mask> a ball in the <mask> .", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["<mask> 1", "<mask> 2"]
    for line in lines:
        probs = [float(part.rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split(" | ")]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    none = nmt("fill-mask", "-m", ckpt, "a man holds a ball .")
    assert none.returncode == 2 and none.stderr.startswith("error: no <mask>") and "Traceback" not in none.stderr


def test_init_from_the_mlm_encoder_trains_a_translator(mlm_run, small_corpus, tmp_path):
    from nmt.config import load_config
    from nmt.train import Trainer

    parent = mlm_run / "checkpoints" / "best.pt"
    args = ["configs/tiny.yaml", [f"run_dir={tmp_path / 'mt'}", f"data.dir={small_corpus}", f"train.init_from={parent}",
                                  "train.max_steps=6", "train.valid_every=6", "train.save_every=6",
                                  "data.max_valid_sentences=4"]]
    messages: list[str] = []
    trainer = Trainer(load_config(*args), log=messages.append)
    parent_weights = torch.load(parent, weights_only=True)["model"]
    own = trainer.model.state_dict()
    encoder = [k for k in own if k.startswith("encoder.")]
    assert encoder and all(torch.equal(own[k], parent_weights[k]) for k in encoder)
    assert torch.equal(own["decoder.embed.token.weight"], parent_weights["encoder.embed.token.weight"])
    assert any("from a task=mlm model.arch=encoder_only parent; starting afresh: decoder.layers.*" in m
               for m in messages)
    trainer.batches.close()
    trainer.metrics.close()
    result = nmt("train", "-c", args[0], *args[1])
    assert result.returncode == 0, result.stderr
    ckpt = tmp_path / "mt" / "checkpoints" / "last.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["config"]["task"] == "translation" and saved["step"] == 6
    assert saved["tokenizer"] == torch.load(parent, weights_only=True)["tokenizer"]  # init_vocab=parent
    assert any(not torch.equal(saved["model"][k], parent_weights[k]) for k in encoder)  # trained on
    translated = nmt("translate", "-m", str(ckpt), "--greedy", input="a man holds a ball .\n")
    assert translated.returncode == 0 and translated.stdout.count("\n") == 1
    refused = nmt("fill-mask", "-m", str(ckpt), "a <mask> .")
    assert refused.returncode == 2 and "needs task=mlm" in refused.stderr and "Traceback" not in refused.stderr
