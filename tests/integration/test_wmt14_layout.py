"""`nmt prepare -c configs/wmt14_en_de.yaml` on a local copy laid out like the Hub's wmt/wmt14."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from tests.integration.conftest import nmt
from tests.unit.test_corpus import save_hub_repo_layout

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it


def _split(corpus: Path, prefix: str) -> datasets.Dataset:
    en, de = ((corpus / f"{prefix}.{lang}").read_text(encoding="utf-8").splitlines() for lang in ("en", "de"))
    return datasets.Dataset.from_dict({"translation": [{"de": d, "en": e} for e, d in zip(en, de, strict=True)]})


def test_prepare_wmt14_config_on_local_hub_layout(tmp_path, small_corpus):
    splits = {"train": _split(small_corpus, "train"), "validation": _split(small_corpus, "val"),
              "test": _split(small_corpus, "test_2016_flickr")}
    save_hub_repo_layout(tmp_path / "wmt14", "de-en", splits)
    args = ["prepare", "-c", "configs/wmt14_en_de.yaml", f"data.hf_name={tmp_path / 'wmt14'}",
            f"data.cache_dir={tmp_path / 'cache'}", "tokenizer.vocab_size=500"]
    first = nmt(*args, f"run_dir={tmp_path / 'run1'}")
    assert first.returncode == 0, first.stderr
    assert "train: kept 600 of 600 pairs" in first.stdout and "valid: 60 pairs" in first.stdout
    assert "test: 40 pairs" in first.stdout
    (cache,) = (tmp_path / "cache").glob("*/meta.json")
    assert f"cached data in {cache.parent}" in first.stdout
    second = nmt(*args, f"run_dir={tmp_path / 'run2'}")  # another experiment on the same corpus
    assert second.returncode == 0, second.stderr
    assert f"using cached data {cache.parent}" in second.stdout
    assert (tmp_path / "run2" / "tokenizer" / "joint.model").read_bytes() == \
        (tmp_path / "run1" / "tokenizer" / "joint.model").read_bytes()
