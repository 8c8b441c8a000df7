from __future__ import annotations

import json

import pytest
import sacrebleu
import torch

from tests.integration.conftest import nmt

COMMANDS = ["train", "prepare", "translate", "evaluate", "average"]


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_help_for_every_command():
    result = nmt("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
        sub = nmt(command, "--help")
        assert sub.returncode == 0 and "usage: nmt " + command in sub.stdout


@pytest.mark.parametrize("args, words", [
    (["model.nonexistent=1"], ["model.nonexistent", "valid keys"]),
    (["train.lr=abc"], ["train.lr"]),
    (["train.precision=fp8"], ["train.precision", "fp32"]),
    (["model.heads=3"], ["divisible"]),
    (["tokenizer.sampled_segmentations=2", "tokenizer.model_type=unigram"], ["sampled_segmentations", "bpe"]),
])
def test_bad_overrides_exit_2_with_one_line(args, words, tmp_path):
    line = _one_line_error(nmt("train", "-c", "configs/tiny.yaml", f"run_dir={tmp_path}", *args))
    for w in words:
        assert w in line


def test_prepare_with_sampled_segmentations_lists_them(small_corpus, tmp_path):
    result = nmt("prepare", "-c", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", f"data.dir={small_corpus}",
                 f"data.cache_dir={tmp_path / 'cache'}", "tokenizer.sampled_segmentations=2")
    assert result.returncode == 0, result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines()}
    assert {"train.sample0", "train.sample1"} <= set(lines) and "valid.sample0" not in lines
    pairs = {name: lines[name].split()[1] for name in ("train", "train.sample0", "train.sample1")}
    assert len(set(pairs.values())) == 1  # the same pairs in every segmentation


def test_missing_config_file():
    assert "not found" in _one_line_error(nmt("train", "-c", "configs/nope.yaml"))


def test_debug_env_shows_the_traceback():
    result = nmt("train", "-c", "configs/nope.yaml", env={"NMT_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_trained_run_has_the_documented_outputs(trained_run):
    assert (trained_run / "config.yaml").is_file()
    names = {p.name for p in (trained_run / "checkpoints").iterdir()}
    assert {"last.pt", "best.pt", "checkpoint_30.pt", "checkpoint_20.pt", "checkpoint_10.pt"} <= names
    records = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_bleu" in r for r in records) and any("tokens_per_s" in r for r in records)


@pytest.mark.slow
def test_rerun_at_max_steps_says_so(trained_run, small_corpus):
    result = nmt("train", "-c", "configs/tiny.yaml", f"run_dir={trained_run}", f"data.dir={small_corpus}",
                 "train.max_steps=30")
    assert result.returncode == 0 and "nothing to do" in result.stdout + result.stderr


@pytest.mark.slow
def test_translate_keeps_lines_and_order(trained_run, tmp_path):
    lines = ["A man is walking.", "", "Two dogs play in the snow .", "word " * 400, "A girl."]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.txt"
    result = nmt("translate", "-m", str(trained_run / "checkpoints" / "last.pt"), "-i", str(src), "-o", str(out),
                 "--beam", "2")
    assert result.returncode == 0, result.stderr
    hyps = out.read_text().split("\n")[:-1]
    assert len(hyps) == len(lines) and hyps[1] == ""
    stdin = nmt("translate", "-m", str(trained_run / "checkpoints" / "last.pt"), "--greedy", input="A man.\n\n")
    assert stdin.returncode == 0 and stdin.stdout.count("\n") == 2


@pytest.mark.slow
def test_translate_rejects_bad_beam(trained_run):
    for beam in ("0", "-1"):
        line = _one_line_error(nmt("translate", "-m", str(trained_run / "checkpoints" / "last.pt"),
                                   "--beam", beam, input="x\n"))
        assert "beam" in line


@pytest.mark.slow
def test_evaluate_matches_sacrebleu(trained_run, small_corpus, tmp_path):
    hyp = tmp_path / "hyp.txt"
    result = nmt("evaluate", "-m", str(trained_run / "checkpoints" / "best.pt"), "--src",
                 str(small_corpus / "test_2016_flickr.en"), "--ref", str(small_corpus / "test_2016_flickr.de"),
                 "--beam", "2", "--out", str(hyp))
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    refs = (small_corpus / "test_2016_flickr.de").read_text().splitlines()
    expected = sacrebleu.corpus_bleu(hyp.read_text().splitlines(), [refs]).score
    assert abs(scores["bleu"] - expected) < 1e-9 and "chrf" in scores and "signature" in json.dumps(scores)


@pytest.mark.slow
def test_evaluate_with_config_uses_the_test_split(trained_run, small_corpus):
    result = nmt("evaluate", "-c", "configs/tiny.yaml", f"run_dir={trained_run}", f"data.dir={small_corpus}",
                 "--greedy")
    assert result.returncode == 0, result.stderr
    assert "bleu" in json.loads(result.stdout)


@pytest.mark.slow
def test_average_last_k(trained_run, tmp_path):
    out = tmp_path / "avg.pt"
    result = nmt("average", "-o", str(out), "--last", "2", str(trained_run))
    assert result.returncode == 0, result.stderr
    again = nmt("translate", "-m", str(out), "--greedy", input="A dog.\n")
    assert again.returncode == 0 and again.stdout.count("\n") == 1


def test_missing_and_corrupt_checkpoints(tmp_path):
    assert "not found" in _one_line_error(nmt("translate", "-m", str(tmp_path / "x.pt"), input="a\n"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert "checkpoint" in _one_line_error(nmt("translate", "-m", str(bad), input="a\n"))


@pytest.mark.parametrize("metric, chosen", [("bleu", [20, 40]), ("loss", [10, 40])])
def test_average_best_k_picks_the_best_validated_checkpoints(tmp_path, metric, chosen):
    from nmt.checkpoint import save_checkpoint
    from nmt.config import dump_config, load_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dump_config(load_config(None, [f"train.best_metric={metric}"]), run / "config.yaml")
    scores = {10: (30.0, 1.0), 20: (33.0, 2.0), 30: (31.0, 3.0), 40: (33.0, 1.5), 50: (40.0, 0.5)}
    records = [{"step": s, "valid_bleu": b, "valid_loss": loss} for s, (b, loss) in scores.items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in (10, 20, 30, 40):  # step 50 was validated, but its checkpoint is gone
        save_checkpoint({"step": step, "model": {"w": torch.full((1,), float(step))}},
                        run / "checkpoints" / f"checkpoint_{step}.pt")
    result = nmt("average", "-o", str(tmp_path / "avg.pt"), "--best", "2", str(run))
    assert result.returncode == 0, result.stderr
    averaged = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert averaged["averaged_from"] == [str(run / "checkpoints" / f"checkpoint_{s}.pt") for s in chosen]
    assert averaged["model"]["w"].item() == sum(chosen) / 2
