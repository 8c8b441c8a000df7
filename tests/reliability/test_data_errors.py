"""Bad corpora are refused with one `error:` line before any training; odd but usable ones work."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest

from tests.reliability.conftest import nmt_process, one_line_error, train_args
from tests.unit.prepare_helpers import write_corpus


@pytest.fixture
def corpus(tmp_path, small_corpus) -> Path:
    """A private, writable copy of the small corpus."""
    return Path(shutil.copytree(small_corpus, tmp_path / "corpus"))


def _train_error(cli, run_dir: Path, corpus: Path) -> str:
    line = one_line_error(cli(*train_args(run_dir, corpus)))
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    return line


def _meta(run_dir: Path) -> dict:
    (meta,) = (run_dir / "data").glob("*/meta.json")
    return json.loads(meta.read_text())


def test_missing_file(cli, tmp_path, corpus):
    (corpus / "train.de").unlink()
    line = _train_error(cli, tmp_path / "run", corpus)
    assert f"corpus file not found: {corpus / 'train.de'}" in line


def test_line_count_mismatch(cli, tmp_path, corpus):
    lines = (corpus / "train.de").read_text(encoding="utf-8").splitlines(keepends=True)
    (corpus / "train.de").write_text("".join(lines[:-1]), encoding="utf-8")
    line = _train_error(cli, tmp_path / "run", corpus)
    assert "line counts differ" in line and f"has {len(lines)} lines" in line and f"has {len(lines) - 1}" in line


def test_non_utf8_bytes_name_the_line(cli, tmp_path, corpus):
    with open(corpus / "train.en", "ab") as f:
        f.write(b"caf\xe9 au lait\n")
    with open(corpus / "train.de", "a", encoding="utf-8") as f:
        f.write("Milchkaffee\n")
    line = _train_error(cli, tmp_path / "run", corpus)
    assert "train.en line 601: not valid UTF-8 (byte 0xe9)" in line


@pytest.mark.parametrize("prefix, split", [("train", "train"), ("val", "valid")])
def test_empty_files(cli, tmp_path, corpus, prefix, split):
    # An empty validation split used to fail only at the first validation, after training steps.
    for lang in ("en", "de"):
        (corpus / f"{prefix}.{lang}").write_text("")
    line = _train_error(cli, tmp_path / "run", corpus)
    assert f"the {split} split is empty" in line and str(corpus / f"{prefix}.en") in line


def test_one_empty_side_is_a_count_mismatch(cli, tmp_path, corpus):
    (corpus / "train.en").write_text("")
    assert "train.en has 0 lines" in _train_error(cli, tmp_path / "run", corpus)


@pytest.mark.slow
def test_a_10000_word_training_line_is_dropped_and_counted(cli, tmp_path, small_corpus, corpus):
    base = cli("prepare", "-c", "configs/tiny.yaml", f"run_dir={tmp_path / 'base'}", f"data.dir={small_corpus}",
               f"data.cache_dir={tmp_path / 'base' / 'data'}")
    assert base.rc == 0, base.err
    words = random.Random(0).choices("a man woman dog runs in the red street".split(), k=10_000)
    for lang in ("en", "de"):
        with open(corpus / f"train.{lang}", "a", encoding="utf-8") as f:
            f.write(" ".join(words) + "\n")
    result = cli("prepare", "-c", "configs/tiny.yaml", f"run_dir={tmp_path / 'long'}", f"data.dir={corpus}",
                 f"data.cache_dir={tmp_path / 'long' / 'data'}")
    assert result.rc == 0, result.err
    before, after = _meta(tmp_path / "base"), _meta(tmp_path / "long")
    assert after["train_read"] == before["train_read"] + 1
    assert after["dropped"]["max_len"] == before["dropped"]["max_len"] + 1
    assert after["pairs"]["train"] == before["pairs"]["train"]
    n = after["train_read"]
    assert f"kept {after['pairs']['train']} of {n} pairs" in result.out
    assert f"{after['dropped']['max_len']} over data.max_len=64" in result.out


@pytest.mark.slow
def test_windows_line_endings_give_the_same_data(cli, tmp_path, small_corpus, corpus):
    for path in corpus.iterdir():
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    for name, directory in (("lf", small_corpus), ("crlf", corpus)):
        result = cli("prepare", "-c", "configs/tiny.yaml", f"run_dir={tmp_path / name}", f"data.dir={directory}",
                     f"data.cache_dir={tmp_path / name / 'data'}")
        assert result.rc == 0, result.err
    lf, crlf = _meta(tmp_path / "lf"), _meta(tmp_path / "crlf")
    assert lf["pairs"] == crlf["pairs"] and lf["tokens"] == crlf["tokens"] and lf["dropped"] == crlf["dropped"]
    (lf_cache,), (crlf_cache,) = (tmp_path / "lf" / "data").glob("*/"), (tmp_path / "crlf" / "data").glob("*/")
    for name in ("train.src", "train.tgt", "valid.src", "valid.tgt"):
        assert (lf_cache / f"{name}.bin").read_bytes() == (crlf_cache / f"{name}.bin").read_bytes()
    text = json.loads((crlf_cache / "valid.text.json").read_text(encoding="utf-8"))
    assert not any("\r" in line for line in text["src"] + text["tgt"])


def test_unreachable_hub_dataset_says_to_use_data_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = nmt_process("train", "-c", "configs/tiny.yaml", f"run_dir={run_dir}", "data.dir=null",
                         "data.hf_name=some/name",
                         env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    err = result.stderr.decode()
    assert result.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == "error: cannot reach the Hugging Face Hub for 'some/name'; use data.dir with local files"
    assert not (run_dir / "checkpoints").exists()


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """A writable synthetic corpus laid out as configs/tiny.yaml expects."""
    return write_corpus(tmp_path / "synthetic", 200)


def _prepare(cli, tmp_path: Path, corpus: Path, *extra: str):
    return cli("prepare", "-c", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", f"data.dir={corpus}",
               f"data.cache_dir={tmp_path / 'cache'}", "tokenizer.vocab_size=60", "data.max_len_ratio=5", *extra)


def test_a_corrupt_gz_file_is_one_line_naming_it(cli, tmp_path, synthetic):
    data = (synthetic / "train.en").read_bytes() * 20
    packed = bytearray(gzip.compress(data))
    packed[len(packed) // 2:len(packed) // 2 + 8] = b"\xff" * 8
    (synthetic / "train.en").unlink()
    (synthetic / "train.en.gz").write_bytes(bytes(packed))
    line = one_line_error(_prepare(cli, tmp_path, synthetic))
    assert line.startswith(f"error: cannot read {synthetic / 'train.en.gz'}: ")
    assert [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"] == []


def test_a_training_file_without_newlines_is_dropped_and_counted(cli, tmp_path, synthetic):
    """Lines over data.max_line_bytes (here a file's tail with \\r line endings) and lines holding
    NUL bytes drop their pairs; the same lines in the validation split are refused."""
    with open(synthetic / "train.en", "ab") as f:
        f.write(b"the dog\0runs\n" + b"a man runs\r" * 200 + b"\n")
    with open(synthetic / "train.de", "ab") as f:
        f.write(b"god q\n" + b"nam q\n")
    result = _prepare(cli, tmp_path, synthetic, "data.max_line_bytes=1000")
    assert result.rc == 0, result.err
    assert ("kept 200 of 202 pairs; dropped 0 empty, 0 over data.max_len=64, 0 over data.max_len_ratio=5.0, "
            "2 with a line over data.max_line_bytes=1000 or holding a NUL byte") in result.out
    (synthetic / "val.de").write_bytes((synthetic / "val.de").read_bytes().replace(b"\n", b"\r"))
    line = one_line_error(_prepare(cli, tmp_path, synthetic, "data.max_line_bytes=100"))
    assert line == (f"error: {synthetic / 'val.de'} line 1: longer than data.max_line_bytes=100 bytes "
                    "(a file without newlines, or with \\r only?)")
