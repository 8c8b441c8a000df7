"""Shared fixtures: a small slice of Multi30k written as a local corpus."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
SPLITS = {"train": 600, "val": 60, "test_2016_flickr": 40}


def _head(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_home(tmp_path_factory):
    """Data caches (default ``$XDG_CACHE_HOME/nmt/data``) go to a temporary folder, for this
    process and the CLI processes the tests start, never to the user's ~/.cache."""
    import os

    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache_home"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    if not MULTI30K.is_dir():
        pytest.skip(f"{MULTI30K} not found")
    return MULTI30K


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, multi30k_dir) -> Path:
    """{train,val,test_2016_flickr}.{en,de}: the first lines of each Multi30k split, plain text."""
    out = tmp_path_factory.mktemp("corpus")
    for split, n in SPLITS.items():
        for lang in ("en", "de"):
            lines = _head(multi30k_dir / f"{split}.{lang}.gz", n)
            (out / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    return out


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: tiny tensors gain nothing from more, and spinning
    threads crawl on a shared 2-core machine. The previous setting comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
