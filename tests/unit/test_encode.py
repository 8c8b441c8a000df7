"""Encoding of the training split in worker processes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
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


def _rows(array) -> list[list[int]]:
    return [array[i].tolist() for i in range(len(array))]


def test_sampled_segmentations_differ_and_decode_to_the_training_text(tmp_path, corpus_dir):
    data = prepare_data(make_cfg(tmp_path, corpus_dir, sampled_segmentations=3), log=Log())
    assert len(data.train_samples) == 3
    for side in ("src", "tgt"):
        decode = getattr(data.tokenizer, f"decode_{side}")
        deterministic = _rows(getattr(data.train, side))
        samples = [_rows(getattr(sample, side)) for sample in data.train_samples]
        assert all(decode(rows) == decode(deterministic) for rows in samples)
        assert len({str(rows) for rows in [deterministic, *samples]}) == 4  # all four differ
        assert all(sum(map(len, rows)) > sum(map(len, deterministic)) for rows in samples)


@pytest.mark.parametrize("workers", [1, 3])
def test_sampled_segmentations_do_not_depend_on_the_workers(tmp_path, corpus_dir, monkeypatch, workers):
    monkeypatch.setattr(encode_mod, "CHUNK", 30)  # 200 pairs: 7 chunks over a pool of processes
    two = prepare_data(make_cfg(tmp_path / "two", corpus_dir, sampled_segmentations=2), log=Log())
    monkeypatch.setattr(encode_mod, "cpu_count", lambda: workers)
    other = prepare_data(make_cfg(tmp_path / "other", corpus_dir, sampled_segmentations=2), log=Log())
    for a, b in zip(two.train_samples, other.train_samples, strict=True):
        for side in ("src", "tgt"):
            assert np.array_equal(getattr(a, side).data, getattr(b, side).data)
            assert np.array_equal(getattr(a, side).offsets, getattr(b, side).offsets)
    assert not np.array_equal(two.train_samples[0].tgt.data, two.train_samples[1].tgt.data)


def test_sampled_segmentations_keep_the_pairs_and_data_max_len(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir, sampled_segmentations=2)
    cfg = replace(cfg, data=replace(cfg.data, max_len=20))
    data = prepare_data(cfg, log=Log())
    longest = max(int(s.tgt.lengths().max()) for s in data.train_samples)
    assert longest <= 20 < 20 * 2  # a sample over max_len falls back to the deterministic side
    assert all(len(s) == len(data.train) for s in data.train_samples)
    decode = data.tokenizer.decode_tgt
    assert all(decode(_rows(s.tgt)) == decode(_rows(data.train.tgt)) for s in data.train_samples)


def test_valid_and_test_are_never_sampled(tmp_path, corpus_dir):
    plain = prepare_data(make_cfg(tmp_path / "plain", corpus_dir), log=Log())
    sampled = prepare_data(make_cfg(tmp_path / "sampled", corpus_dir, sampled_segmentations=2), log=Log())
    meta = json.loads((Path(sampled.cache_dir) / "meta.json").read_text())
    assert meta["splits"] == ["train", "train.sample0", "train.sample1", "valid", "test"]
    for name in ("valid", "test"):
        for side in ("src", "tgt"):
            a, b = getattr(getattr(plain, name), side), getattr(getattr(sampled, name), side)
            assert np.array_equal(a.data, b.data) and np.array_equal(a.offsets, b.offsets)
