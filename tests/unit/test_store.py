"""Token arrays memory-mapped from a cache folder."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.unit.prepare_helpers import Log, make_cfg

from nmt.data import store as store_mod
from nmt.data.prepare import prepare_data
from nmt.data.store import CorruptCacheError, ParallelData, PreparedData, TokenArray


def mapped_rss_kb(path: Path) -> int:
    """This process's resident KiB of the memory maps of ``path`` (Linux ``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_cached_arrays_give_the_memory_maps_pages_back_after_each_read(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setattr(store_mod, "LENGTHS_BLOCK", 7)  # several blocks and a ragged last one
    monkeypatch.setattr(store_mod, "RELEASE_MIN", 0)  # the tiny files count as large
    data = prepare_data(make_cfg(tmp_path, corpus_dir), log=Log())
    cache = Path(data.cache_dir)
    for name in ("train.src", "train.tgt", "valid.tgt"):
        split, side = name.split(".")
        cached = getattr(getattr(data, split), side)
        in_memory = TokenArray(np.array(cached.data), np.array(cached.offsets))
        assert np.array_equal(cached.lengths(np.int32), np.diff(in_memory.offsets))
        assert cached.lengths(np.int32).dtype == np.int32
        idx = np.array([5, 0, 19, 5, len(cached) - 1])
        (lens, mask, tokens), (want_lens, want_mask, want_tokens) = cached.take(idx), in_memory.take(idx)
        assert np.array_equal(lens, want_lens) and np.array_equal(tokens, want_tokens)
        assert np.array_equal(mask, want_mask) and mask.sum() == len(tokens)
        assert np.array_equal(tokens, np.concatenate([in_memory[i] for i in idx]))
        if sys.platform.startswith("linux"):  # RSS no longer holds what the reads touched
            assert mapped_rss_kb(cache / f"{name}.bin") == 0
            assert mapped_rss_kb(cache / f"{name}.offsets.npy") == 0


def test_token_array_select_and_lengths():
    arr = TokenArray.from_lengths(np.arange(10, dtype=np.uint16), np.array([3, 0, 2, 5]))
    assert arr.lengths().tolist() == [3, 0, 2, 5] and len(arr) == 4
    assert arr[3].tolist() == [5, 6, 7, 8, 9]
    kept = arr.select(np.array([True, True, False, True]))
    assert [kept[i].tolist() for i in range(3)] == [[0, 1, 2], [], [5, 6, 7, 8, 9]]


def test_load_refuses_a_bin_file_cut_short(tmp_path):
    arr = TokenArray.from_lengths(np.arange(10, dtype=np.uint16), np.array([3, 0, 2, 5]))
    arr.save(tmp_path, "a")
    assert TokenArray.load(tmp_path, "a", "uint16")[3].tolist() == [5, 6, 7, 8, 9]
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(16)
    with pytest.raises(CorruptCacheError, match=r"a.bin: 16 bytes, the offsets say 10 tokens of uint16"):
        TokenArray.load(tmp_path, "a", "uint16")
    (tmp_path / "a.offsets.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(CorruptCacheError, match="a.offsets.npy"):
        TokenArray.load(tmp_path, "a", "uint16")


def test_epoch_e_trains_on_sampled_segmentation_e_mod_k():
    def data(seed: int) -> ParallelData:
        array = TokenArray.from_lengths(np.full(3, seed, np.uint16), np.array([1, 1, 1]))
        return ParallelData(array, array)

    deterministic, samples = data(9), [data(k) for k in range(3)]
    plain = PreparedData(None, deterministic, deterministic, None)  # type: ignore[arg-type]
    assert all(plain.train_for_epoch(e) is deterministic for e in range(4))
    sampled = PreparedData(None, deterministic, deterministic, None, train_samples=samples)  # type: ignore[arg-type]
    assert [int(sampled.train_for_epoch(e).src.data[0]) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
