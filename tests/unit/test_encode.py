"""Encoding of the training split in worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tests.unit.prepare_helpers import Log, make_cfg

from nmt.data import encode as encode_mod
from nmt.data.prepare import prepare_data


def test_parallel_encoding_equals_in_process(tmp_path, corpus_dir, monkeypatch):
    one = prepare_data(make_cfg(tmp_path / "one", corpus_dir), log=Log())
    monkeypatch.setattr(encode_mod, "CHUNK", 30)  # 200 pairs: 7 chunks over a pool of processes
    pool = prepare_data(make_cfg(tmp_path / "pool", corpus_dir), log=Log())
    for side in ("src", "tgt"):
        a, b = getattr(one.train, side), getattr(pool.train, side)
        assert np.array_equal(a.data, b.data) and np.array_equal(a.offsets, b.offsets)


def test_offsets_summed_in_blocks(tmp_path, corpus_dir, monkeypatch):
    one = prepare_data(make_cfg(tmp_path / "one", corpus_dir), log=Log())
    monkeypatch.setattr(encode_mod, "OFFSET_BLOCK", 7)  # 200 sentences: many blocks and a ragged tail
    blocks = prepare_data(make_cfg(tmp_path / "blocks", corpus_dir), log=Log())
    for side in ("src", "tgt"):
        assert np.array_equal(getattr(one.train, side).offsets, getattr(blocks.train, side).offsets)
    assert not list(Path(blocks.cache_dir).glob("*.tmp"))
