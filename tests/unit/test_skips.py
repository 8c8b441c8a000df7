"""SkipCounter: attempted, skipped and applied updates, read on the host only when asked."""

from __future__ import annotations

import torch

from nmt.skips import SkipCounter

GOOD, BAD = torch.tensor(False), torch.tensor(True)


def test_counts_are_read_only_on_read():
    skips = SkipCounter(torch.device("cpu"))
    for bad in (GOOD, BAD, BAD, GOOD):
        skips.record(bad)
    # until read, the host counts every attempt as applied
    assert (skips.attempted, skips.skipped, skips.applied) == (4, 0, 4)
    assert skips.read() == 2
    assert (skips.attempted, skips.skipped, skips.applied, skips.consecutive) == (4, 2, 2, 0)
    assert skips.cause == "nonfinite"
    assert skips.read() == 0  # each skip is reported once


def test_consecutive_counts_the_current_run_of_skips():
    skips = SkipCounter(torch.device("cpu"))
    for bad in (BAD, GOOD, BAD, BAD, BAD):
        skips.record(bad)
    skips.read()
    assert skips.consecutive == 3
    skips.record(GOOD)
    skips.read()
    assert skips.consecutive == 0


def test_a_known_skip_keeps_its_cause():
    skips = SkipCounter(torch.device("cpu"))
    skips.record(BAD)  # decided on the device, not yet read
    skips.skip("oom")
    assert skips.known
    assert skips.read() == 2 and skips.cause == "oom" and skips.consecutive == 2
    skips.record(GOOD)
    assert not skips.known


def test_starts_from_a_resumed_run():
    skips = SkipCounter(torch.device("cpu"), applied=10, skipped=3, consecutive=2)
    assert (skips.attempted, skips.applied) == (13, 10)
    skips.record(BAD)
    skips.read()
    assert (skips.skipped, skips.applied, skips.consecutive) == (4, 10, 3)


def test_record_never_reads_the_device(monkeypatch):
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name: reads.append(_n) or _r(self, *a))
    skips = SkipCounter(torch.device("cpu"))
    skips.record(BAD)
    skips.record(GOOD)
    assert reads == []
    skips.read()
    assert reads
