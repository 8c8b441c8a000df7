"""`nmt export` and `nmt translate --engine ctranslate2` end to end on the tiny trained model (the
transformers folder itself is checked in tests/unit/test_export.py)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import nmt

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it

pytest.importorskip("transformers", reason="nmt export needs transformers (nmt[export])")
pytest.importorskip("ctranslate2", reason="nmt export --to ctranslate2 needs ctranslate2 (nmt[export])")


def test_ctranslate2_engine_translates_like_ours(trained_run, small_corpus, tmp_path):
    ckpt, src = str(trained_run / "checkpoints" / "last.pt"), str(small_corpus / "test_2016_flickr.en")
    out = tmp_path / "ct2"
    result = nmt("export", "--to", "ctranslate2", "-m", ckpt, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert {"model.bin", "source.spm", "nmt_decode.json"} <= {p.name for p in out.iterdir()}
    ct2 = nmt("translate", "--engine", "ctranslate2", "-m", str(out), "-i", src, "--greedy", "--threads", "1")
    ours = nmt("translate", "-m", ckpt, "-i", src, "--greedy")
    assert ct2.returncode == 0 and ours.returncode == 0, ct2.stderr + ours.stderr
    assert ct2.stdout == ours.stdout and ct2.stdout.count("\n") == 40


def test_bad_export_arguments_are_one_line_errors(trained_run, tmp_path):
    ckpt = str(trained_run / "checkpoints" / "last.pt")
    result = nmt("export", "--to", "transformers", "-m", ckpt, "-o", str(tmp_path), "--quantization", "int8")
    assert result.returncode == 2 and result.stderr.startswith("error: --quantization")
    result = nmt("translate", "--engine", "ctranslate2", "-m", str(tmp_path / "none"), "--greedy",
                 input="a\n")
    assert result.returncode == 2 and "not an nmt CTranslate2 export" in result.stderr
    result = nmt("serve", "-m", str(tmp_path))
    assert result.returncode == 2 and "not a CTranslate2 export" in result.stderr


@pytest.mark.parametrize("to", ["ctranslate2", "transformers"])
def test_export_never_deletes_a_folder_it_did_not_write(trained_run, tmp_path, to):
    ckpt = str(trained_run / "checkpoints" / "last.pt")
    mine = tmp_path / "run"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    for extra in ([], ["--force"]):  # --force replaces a previous export only
        result = nmt("export", "--to", to, "-m", ckpt, "-o", str(mine), *extra)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert [p.name for p in mine.iterdir()] == ["notes.txt"]
        assert (mine / "notes.txt").read_text() == "keep me\n"
    out = tmp_path / "export"
    assert nmt("export", "--to", to, "-m", ckpt, "-o", str(out)).returncode == 0
    (out / "stale").write_text("")
    refused = nmt("export", "--to", to, "-m", ckpt, "-o", str(out))
    assert refused.returncode == 2 and "--force" in refused.stderr and (out / "stale").exists()
    replaced = nmt("export", "--to", to, "-m", ckpt, "-o", str(out), "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "stale").exists() and (out / "nmt_decode.json").is_file()
    # written beside the target and renamed: nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]
