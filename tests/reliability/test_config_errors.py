"""A bad config is one `error:` line (exit 2) naming the problem, before anything is written."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import one_line_error


def _train(cli, tmp_path, *args):
    run_dir = tmp_path / "run"
    result = cli("train", *args, f"run_dir={run_dir}")
    assert not run_dir.exists(), "a rejected config must not create the run_dir"
    return one_line_error(result)


def test_yaml_syntax_error_names_the_line(cli, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  d_model: 64\n  heads: 4\n  d_ff: [128\ntrain:\n  lr: 1.0e-3\n")
    line = _train(cli, tmp_path, "-c", config)
    assert "invalid YAML" in line and str(config) in line and "line 5" in line


def test_unknown_key_in_the_file_lists_the_valid_keys(cli, tmp_path):
    config = tmp_path / "unknown.yaml"
    config.write_text("train:\n  max_step: 10\n")
    line = _train(cli, tmp_path, "-c", config)
    assert "unknown key train.max_step" in line and "max_steps" in line


@pytest.mark.parametrize("override, words", [
    ("model.nonexistent=1", ["unknown key model.nonexistent", "d_model"]),
    ("train.max_steps=abc", ["train.max_steps must be int", "'abc'"]),
    ("model.dropout=[0.1]", ["model.dropout must be float"]),
    ("model.tie_embeddings=maybe", ["model.tie_embeddings must be bool"]),
    ("train=3", ["train must be a mapping"]),
])
def test_unknown_key_or_wrong_type(cli, tmp_path, override, words):
    line = _train(cli, tmp_path, "-c", "configs/tiny.yaml", override)
    for word in words:
        assert word in line


@pytest.mark.parametrize("override, words", [
    ("model.heads=3", ["model.d_model (64) must be divisible by model.heads (3)"]),
    ("model.heads=0", ["model.heads", ">= 1"]),  # was a ZeroDivisionError traceback
    ("model.dropout=-0.1", ["model.dropout must be in [0, 1)", "-0.1"]),
    ("train.precision=fp8", ["train.precision", "'fp8'", "fp32, bf16, fp16"]),
    ("train.adam_betas=[1.5,0.98]", ["train.adam_betas must be in [0, 1)"]),  # was torch's ValueError
    ("train.adam_eps=-1", ["train.adam_eps must be >= 0"]),  # was torch's ValueError
    ("tokenizer.vocab_size=4", ["tokenizer.vocab_size must be >= 8"]),
    # tiny.yaml: model.max_positions 256; a valid sentence this long stopped runs at their first validation
    ("data.max_len=256", ["data.max_len (256) must be < model.max_positions (256)"]),
])
def test_value_out_of_range(cli, tmp_path, override, words):
    line = _train(cli, tmp_path, "-c", "configs/tiny.yaml", override)
    for word in words:
        assert word in line


def test_missing_config_file(cli, tmp_path):
    line = _train(cli, tmp_path, "-c", tmp_path / "nope.yaml")
    assert "config file not found" in line
