"""A decoder-only translator (model.arch=decoder_only) through the command line: it trains, resumes
exactly, translates, evaluates, averages and serves like an encoder-decoder; export refuses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import nmt

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it

LINES = "A man is riding a bike.\nTwo dogs play in the snow.\n"


def _args(run: Path, corpus: Path, steps: int) -> list[str]:
    return ["train", "-c", "configs/tiny.yaml", f"run_dir={run}", f"data.dir={corpus}", f"train.max_steps={steps}",
            "model.arch=decoder_only", "model.source_attention=bidirectional", "train.log_every=1",
            "train.valid_every=4", "train.save_every=4", "train.keep_last=2", "train.batch_tokens=256",
            "data.max_valid_sentences=4"]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def decoder_only_run(tmp_path_factory, small_corpus) -> Path:
    run = tmp_path_factory.mktemp("decoder_only") / "run"
    result = nmt(*_args(run, small_corpus, 8))
    assert result.returncode == 0, result.stderr
    return run


def test_trains_and_resumes_exactly(decoder_only_run, small_corpus, tmp_path):
    saved = torch.load(decoder_only_run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["config"]["model"]["arch"] == "decoder_only" and saved["step"] == 8
    assert not any(k.startswith("encoder.") or ".cross_attn." in k for k in saved["model"])
    run = tmp_path / "resumed"
    assert nmt(*_args(run, small_corpus, 4)).returncode == 0
    result = nmt(*_args(run, small_corpus, 8))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    straight, resumed = _losses(decoder_only_run), _losses(run)
    for step in range(1, 9):
        assert abs(straight[step] - resumed[step]) < 1e-6, step
    weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved["model"][k], weights[k]) for k in weights)


def test_translates_with_greedy_beam_and_sampling(decoder_only_run):
    ckpt = str(decoder_only_run / "checkpoints" / "best.pt")
    outputs = {}
    for search in (["--greedy"], ["--beam", "1"], ["--beam", "3"], ["--sample", "--seed", "3"]):
        result = nmt("translate", "-m", ckpt, *search, input=LINES)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("\n") == 2
        outputs[search[-1]] = result.stdout
    assert outputs["--greedy"] == outputs["1"]


def test_evaluates_and_averages(decoder_only_run, small_corpus, tmp_path):
    result = nmt("evaluate", "-m", str(decoder_only_run / "checkpoints" / "last.pt"), "--src",
                 str(small_corpus / "test_2016_flickr.en"), "--ref", str(small_corpus / "test_2016_flickr.de"))
    assert result.returncode == 0, result.stderr
    assert {"bleu", "chrf"} <= set(json.loads(result.stdout))
    out = tmp_path / "avg.pt"
    result = nmt("average", "-o", str(out), "--last", "2", str(decoder_only_run))
    assert result.returncode == 0, result.stderr
    again = nmt("translate", "-m", str(out), "--greedy", input=LINES)
    assert again.returncode == 0 and again.stdout.count("\n") == 2


def test_serves_translations(decoder_only_run):
    from fastapi.testclient import TestClient

    from nmt.serve import ServeOptions, TorchBackend, create_app

    ckpt = decoder_only_run / "checkpoints" / "best.pt"
    expected = nmt("translate", "-m", str(ckpt), input=LINES).stdout.splitlines()
    app = create_app(TorchBackend(ckpt, threads=1), ServeOptions())
    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.post("/translate", json={"q": LINES.splitlines(), "source": "en", "target": "de"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["translatedText"] == expected
        reply = client.post("/attention", json={"q": "A dog.", "source": "en", "target": "de"})
        assert "model.arch=encoder_decoder" in reply.json()["error"]


def test_export_refuses_in_one_line_and_writes_nothing(decoder_only_run, tmp_path):
    for to in ("transformers", "ctranslate2"):
        out = tmp_path / to
        result = nmt("export", "--to", to, "-m", str(decoder_only_run / "checkpoints" / "last.pt"), "-o", str(out))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
        assert "model.arch=decoder_only" in lines[0]
        assert not out.exists()
