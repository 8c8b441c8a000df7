from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tests.pictures import png_size

from nmt.cli import run
from nmt.errors import NMTError
from nmt.model.embeddings import sinusoidal_table
from nmt.plot import plot_positional, plot_training, positional_encoding, read_metrics

pytest.importorskip("matplotlib")

def _write_metrics(run_dir: Path, records: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "metrics.jsonl").write_text(text)


def _records(steps=range(10, 101, 10)) -> list[dict]:
    out = []
    for s in steps:
        out.append({"step": s, "loss": 8 - s / 20, "nll_loss": 7.5 - s / 20, "ppl": 100.0, "lr": s * 1e-5,
                    "grad_norm": 1.0, "tokens_per_s": 1000 + s, "padding_efficiency": 0.9,
                    "skipped_steps": 0, "epoch": 0})
        if s % 50 == 0:
            out.append({"step": s, "valid_loss": 7 - s / 25, "valid_ppl": 50.0, "valid_bleu": s / 10,
                        "valid_chrf": s / 5})
    return out


def test_read_metrics_splits_records_and_tolerates_resume_and_a_torn_line(tmp_path):
    records = _records() + [{"step": 100, "loss": 1.0, "lr": 0.1, "tokens_per_s": 5.0}]  # resumed step
    _write_metrics(tmp_path, records, tail='{"step": 110, "lo')
    train, valid = read_metrics(tmp_path)
    assert [r["step"] for r in train] == list(range(10, 101, 10))
    assert train[-1]["loss"] == 1.0
    assert [r["step"] for r in valid] == [50, 100]


@pytest.mark.parametrize("content, message", [(None, "no metrics.jsonl"), ("", "no records"),
                                              ('{"loss": 1}\n{"step": 2}\n', "line 1 has no integer")])
def test_read_metrics_errors_are_one_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(NMTError, match=message) as info:
        read_metrics(tmp_path)
    assert "\n" not in str(info.value)


def test_plot_training_writes_a_png(tmp_path):
    _write_metrics(tmp_path / "run", _records())
    out = plot_training(tmp_path / "run", tmp_path / "pics" / "curves.png")
    width, height = png_size(out)
    assert width > 600 and height > 400


def test_plot_training_without_validation_records(tmp_path):
    _write_metrics(tmp_path / "run", [r for r in _records() if "valid_loss" not in r])
    png_size(plot_training(tmp_path / "run", tmp_path / "curves.png"))


def test_positional_values_come_from_the_model_module(tmp_path):
    pe = positional_encoding(16, 30)
    assert pe.shape == (30, 16)
    assert torch.equal(pe, sinusoidal_table(30, 16))
    png_size(plot_positional(16, 30, tmp_path / "pe.png"))


def test_cli_plot_positional_and_run(tmp_path, capsys):
    assert run(["plot", "--positional", "--d-model", "64", "--length", "20", "-o", str(tmp_path / "pe.png")]) == 0
    png_size(tmp_path / "pe.png")
    _write_metrics(tmp_path / "run", _records())
    assert run(["plot", str(tmp_path / "run")]) == 0
    png_size(tmp_path / "run" / "curves.png")


@pytest.mark.parametrize("argv, message", [
    (["plot"], "needs RUN_DIR"),
    (["plot", "somewhere", "--positional"], "not both"),
    (["plot", "--positional", "--d-model", "0"], "must be >= 1"),
    (["plot", "/nonexistent/run"], "no metrics.jsonl"),
])
def test_cli_plot_usage_errors(argv, message, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    _write_metrics(tmp_path / "run", _records())
    assert run(["plot", str(tmp_path / "run")]) == 2
    assert run(["plot", "--positional"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["error: plotting needs the matplotlib package: pip install 'nmt[plot]'"] * 2
    assert not (tmp_path / "run" / "curves.png").exists()


def test_an_lm_run_plots_validation_perplexity(tmp_path):
    from nmt.plot import _score_panel, new_figure

    records = [{k: v for k, v in r.items() if k not in ("valid_bleu", "valid_chrf")} for r in _records()]
    _write_metrics(tmp_path / "run", records)
    png_size(plot_training(tmp_path / "run", tmp_path / "curves.png"))
    ax = new_figure(4, 3).subplots()
    _score_panel(ax, read_metrics(tmp_path / "run")[1])
    assert ax.get_title() == "validation perplexity"
    assert list(ax.lines[0].get_ydata()) == [50.0, 50.0]
    ax = new_figure(4, 3).subplots()
    _score_panel(ax, [r for r in _records() if "valid_bleu" in r])
    assert ax.get_title() == "validation BLEU / chrF"


def test_an_mlm_run_plots_masked_token_accuracy(tmp_path):
    from nmt.plot import _score_panel, new_figure

    records = [{k: v for k, v in r.items() if k not in ("valid_bleu", "valid_chrf")} for r in _records()]
    for i, r in enumerate(r for r in records if "valid_loss" in r):
        r["valid_accuracy"] = 10.0 + i
    _write_metrics(tmp_path / "run", records)
    png_size(plot_training(tmp_path / "run", tmp_path / "curves.png"))
    ax = new_figure(4, 3).subplots()
    _score_panel(ax, read_metrics(tmp_path / "run")[1])
    assert ax.get_title() == "validation masked-token accuracy (%)"
    assert list(ax.lines[0].get_ydata()) == [10.0, 11.0]
