"""A language model (task lm) through the command line: it prepares and trains on the German side of
the synthetic corpus with falling validation perplexity, samples with nmt generate, and the
translation commands refuse it in one line naming nmt generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import nmt

pytestmark = pytest.mark.slow  # trains a model

LM = ["task=lm", "model.arch=decoder_only", "data.lang=de"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, small_corpus) -> Path:
    run = tmp_path_factory.mktemp("lm") / "run"
    common = ["-c", "configs/tiny.yaml", f"run_dir={run}", f"data.dir={small_corpus}", *LM]
    prepared = nmt("prepare", *common)
    assert prepared.returncode == 0, prepared.stderr
    assert "train: 600 pairs, 0 src /" in prepared.stdout
    result = nmt("train", *common, "train.max_steps=30", "train.valid_every=10", "train.log_every=10",
                 "train.batch_tokens=512")
    assert result.returncode == 0, result.stderr
    assert "using cached data" in result.stdout
    return run


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_validation_perplexity_is_logged_and_falls(lm_run):
    records = [json.loads(x) for x in (lm_run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in valid] == [10, 20, 30] and not any("valid_bleu" in r for r in valid)
    ppl = [r["valid_ppl"] for r in valid]
    assert ppl[0] > ppl[1] > ppl[2]
    saved = torch.load(lm_run / "checkpoints" / "best.pt", weights_only=True)
    assert saved["config"]["task"] == "lm" and saved["step"] == 30  # best by loss


def test_generate_samples_the_same_for_the_same_seed(lm_run):
    ckpt = str(lm_run / "checkpoints" / "best.pt")
    args = ("generate", "-m", ckpt, "--prompt", "Ein Hund", "--num", "3", "--max-len", "12", "--top-k", "20")
    first, again = nmt(*args, "--seed", "7"), nmt(*args, "--seed", "7")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("Ein Hund") for line in lines)
    assert again.stdout == first.stdout
    assert nmt(*args, "--seed", "8").stdout != first.stdout
    scratch = nmt("generate", "-m", ckpt, "--num", "2", "--temperature", "0")
    assert scratch.returncode == 0 and len(scratch.stdout.splitlines()) == 2


def test_translation_commands_refuse_it_naming_nmt_generate(lm_run, tmp_path, small_corpus):
    ckpt = str(lm_run / "checkpoints" / "best.pt")
    text = tmp_path / "lines.txt"
    text.write_text("A dog.\n")
    commands = [("translate", "-m", ckpt), ("evaluate", "-m", ckpt, "--src", str(text), "--ref", str(text)),
                ("serve", "-m", ckpt), ("export", "--to", "transformers", "-m", ckpt, "-o", str(tmp_path / "x")),
                ("attention", "-m", ckpt, "--src", "A dog.")]
    for command in commands:
        line = _one_line_error(nmt(*command, input="A dog.\n"))
        assert line.endswith("is a task=lm model and this command needs task=translation: use nmt generate"), line
    assert not (tmp_path / "x").exists()
    line = _one_line_error(nmt("evaluate", "-c", "configs/tiny.yaml", f"run_dir={lm_run}", f"data.dir={small_corpus}", *LM))
    assert line.endswith("configs/tiny.yaml is a task=lm model and this command needs task=translation: use nmt generate")


def test_generate_refuses_a_translation_checkpoint(tmp_path):
    from nmt.checkpoint import save_checkpoint
    from nmt.config import Config, to_dict

    ckpt = tmp_path / "mt.pt"
    save_checkpoint({"config": to_dict(Config()), "tokenizer": {}, "model": {}, "step": 1}, ckpt)
    line = _one_line_error(nmt("generate", "-m", str(ckpt)))
    assert line.endswith("is a task=translation model and this command needs task=lm: use nmt translate")
