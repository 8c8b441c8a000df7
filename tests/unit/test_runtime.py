from __future__ import annotations

import sys

import pytest
import torch

from nmt.runtime import configure_math, keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_settings_take_on_linux():
    assert keep_freed_memory() is True


def test_the_allocator_settings_apply_only_without_a_gpu(monkeypatch, tmp_path):
    import nmt.cli
    import nmt.runtime

    calls = []
    monkeypatch.setattr(nmt.runtime, "keep_freed_memory", lambda: calls.append(1))
    average = ["average", "-o", str(tmp_path / "avg.pt"), "--last", "1", str(tmp_path)]  # fails fast
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nmt.cli.run(average) == 2 and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nmt.cli.run(average) == 2 and calls == [1]
    # prepare runs no torch code: the memory it frees goes back to the system
    assert nmt.cli.run(["prepare", "-c", str(tmp_path / "missing.yaml")]) == 2 and calls == [1]


def test_fp32_on_cuda_uses_tf32_and_the_cpu_is_left_alone():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        configure_math(torch.device("cpu"), "fp32")
        configure_math(torch.device("cuda", 0), "bf16")
        assert not torch.backends.cuda.matmul.allow_tf32
        configure_math(torch.device("cuda", 0), "fp32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
