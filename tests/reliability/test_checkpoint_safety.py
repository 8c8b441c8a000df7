"""Checkpoints: bad files are refused in one line, pickled code never runs, saves never tear."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from nmt.checkpoint import load_checkpoint
from tests.reliability.conftest import one_line_error, train_args


class Payload:
    """Unpickling this runs ``touch MARKER``: what a poisoned shared checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poisoned(tiny_checkpoint: Path, path: Path, marker: Path) -> Path:
    """A real checkpoint (weights, optimizer, config...) with the payload hidden in its state."""
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["optimizer"]["param_groups"][0]["note"] = Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _truncated(tiny_checkpoint: Path, path: Path) -> Path:
    data = tiny_checkpoint.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def _random(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(20_000))
    return path


def _use(cli, how: str, path: Path, run_dir: Path, corpus: Path):
    """Hand ``path`` to nmt the way a user would: translate -m, train.init_from, or resume."""
    if how == "translate":
        return cli("translate", "-m", path, stdin=b"A man.\n")
    if how == "init_from":
        return cli(*train_args(run_dir, corpus, f"train.init_from={path}"))
    assert path == run_dir / "checkpoints" / "last.pt"
    return cli(*train_args(run_dir, corpus))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["translate", "init_from", "resume"])
def test_malicious_pickle_is_refused_and_never_runs(cli, tmp_path, small_corpus, tiny_checkpoint, how):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    path = run_dir / "checkpoints" / "last.pt" if how == "resume" else tmp_path / "shared.pt"
    _poisoned(tiny_checkpoint, path, marker)
    before = path.read_bytes()
    line = one_line_error(_use(cli, how, path, run_dir, small_corpus))
    assert f"refusing to load {path}" in line and "GLOBAL" in line
    assert not marker.exists()
    assert path.read_bytes() == before  # a refused resume does not overwrite the user's file
    if how != "translate":
        assert not (run_dir / "metrics.jsonl").exists()
    # The payload is live: loading it the unsafe way runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind, how", [("truncated", "translate"), ("truncated", "resume"),
                                       ("random", "translate"), ("random", "init_from")])
@pytest.mark.slow
def test_truncated_or_random_checkpoint(cli, tmp_path, small_corpus, tiny_checkpoint, kind, how):
    run_dir = tmp_path / "run"
    path = run_dir / "checkpoints" / "last.pt" if how == "resume" else tmp_path / "bad.pt"
    _truncated(tiny_checkpoint, path) if kind == "truncated" else _random(path)
    line = one_line_error(_use(cli, how, path, run_dir, small_corpus))
    assert f"{path} is not a readable checkpoint (truncated or corrupt?)" in line


# A different tokenizer.vocab_size is no mismatch: fine-tuning encodes with the parent's tokenizer.
@pytest.mark.parametrize("override, tensors", [
    ("model.d_model=32", ["encoder.embed.token.weight (256, 64) vs (256, 32)"]),
    ("model.encoder_layers=3", ["missing: encoder.layers.2."]),
])
@pytest.mark.slow
def test_init_from_a_different_shape_names_the_tensors(cli, tmp_path, small_corpus,
                                                       tiny_checkpoint, override, tensors):
    run_dir = tmp_path / "run"
    line = one_line_error(cli(*train_args(run_dir, small_corpus, f"train.init_from={tiny_checkpoint}", override)))
    assert f"{tiny_checkpoint} does not fit this model" in line
    for tensor in tensors:
        assert tensor in line
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_run_dir_that_cannot_be_created(cli, tmp_path, small_corpus):
    # Root ignores permission bits, so put the run_dir below a regular file: that fails for everyone.
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    line = one_line_error(cli(*train_args(afile / "run", small_corpus)))
    assert f"run_dir {afile / 'run'} is not writable" in line
    assert afile.read_text() == "keep me\n"


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_last_pt(cli, tmp_path, small_corpus, monkeypatch):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    args = train_args(run_dir, small_corpus, "train.max_steps=4", "train.save_every=2", "train.keep_last=0")
    real_save = torch.save
    calls = []

    def save_until_the_disk_fills(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *a, **kw)
        f.write(b"\0" * 4096)  # part of the new checkpoint reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    line = one_line_error(cli(*args))
    monkeypatch.setattr(torch, "save", real_save)
    assert len(calls) == 2
    assert f"could not save {ckpts / 'last.pt'}: No space left on device" in line and "intact" in line
    assert [p.name for p in ckpts.iterdir()] == ["last.pt"]  # no half-written temp file left
    assert load_checkpoint(ckpts / "last.pt")["step"] == 2
    # Once there is space again, the run resumes from the kept checkpoint and finishes.
    result = cli(*args)
    assert result.rc == 0, result.err
    assert f"resumed from {ckpts / 'last.pt'} at step 2" in result.out
    assert load_checkpoint(ckpts / "last.pt")["step"] == 4


def test_translate_names_a_missing_checkpoint(cli, tmp_path):
    line = one_line_error(cli("translate", "-m", tmp_path / "nope.pt", stdin=b"A man.\n"))
    assert f"checkpoint not found: {tmp_path / 'nope.pt'}" in line

