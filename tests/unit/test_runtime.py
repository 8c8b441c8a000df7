from __future__ import annotations

import sys

import pytest

from nmt.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_settings_take_on_linux():
    assert keep_freed_memory() is True


def test_the_allocator_settings_apply_only_without_a_gpu(monkeypatch, tmp_path):
    import torch

    import nmt.cli

    calls = []
    monkeypatch.setattr(nmt.cli, "keep_freed_memory", lambda: calls.append(1))
    average = ["average", "-o", str(tmp_path / "avg.pt"), "--last", "1", str(tmp_path)]  # fails fast
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nmt.cli.run(average) == 2 and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nmt.cli.run(average) == 2 and calls == [1]
