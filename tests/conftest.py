"""Shared fixtures: a synthetic parallel corpus generated here, so the suite needs no downloaded data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.synthetic_corpus import write_corpus


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
def small_corpus(tmp_path_factory) -> Path:
    """{train,val,test_2016_flickr}.{en,de}: 600/60/40 lines of the synthetic corpus
    (tests/synthetic_corpus.py), plain text, laid out as Multi30k is."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: tiny tensors gain nothing from more, and spinning
    threads crawl on a shared 2-core machine. The previous setting comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def nan_filled_new_empty(monkeypatch):
    """Tensor.new_empty returns NaNs for the test, so no uninitialised buffer slot can go unnoticed."""
    def new_empty(self, *size, **kwargs):
        if len(size) == 1 and not isinstance(size[0], int):
            size = tuple(size[0])
        return self.new_full(size, float("nan"), **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
