"""Fixtures of the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.unit.prepare_helpers import make_corpus, write_split


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    directory = tmp_path / "corpus"
    directory.mkdir()
    write_split(directory, "train", *make_corpus(200, 0))
    write_split(directory, "val", *make_corpus(20, 1))
    write_split(directory, "test", *make_corpus(20, 2))
    return directory
