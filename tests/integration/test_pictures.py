"""`nmt plot` and `nmt attention` end to end on the tiny trained run."""

from __future__ import annotations

import pytest

from tests.integration.conftest import nmt
from tests.pictures import png_size

pytest.importorskip("matplotlib")

SOURCE = "A dog runs on the grass."


def test_help_lists_the_picture_commands():
    result = nmt("--help")
    assert result.returncode == 0
    assert "plot" in result.stdout and "attention" in result.stdout


@pytest.mark.slow
def test_plot_training_curves(trained_run, tmp_path):
    out = tmp_path / "curves.png"
    result = nmt("plot", str(trained_run), "-o", str(out))
    assert result.returncode == 0, result.stderr
    width, height = png_size(out)
    assert width >= 800 and height >= 500


def test_plot_positional_encoding(tmp_path):
    out = tmp_path / "pe.png"
    result = nmt("plot", "--positional", "--d-model", "128", "--length", "50", "-o", str(out))
    assert result.returncode == 0, result.stderr
    png_size(out)


@pytest.mark.slow
def test_attention_pictures_of_the_greedy_translation(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.pt"
    result = nmt("attention", "-m", str(ckpt), "--src", SOURCE, "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "target: " in result.stderr  # the greedy translation (compared with translate in the unit tests)
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"encoder_self_layer1.png", "decoder_self_layer2.png", "cross_layer1.png", "cross_mean.png",
            "encoder_self_mean.png", "decoder_self_mean.png"} <= names
    for name in names:
        png_size(tmp_path / name)
