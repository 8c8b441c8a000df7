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


def _backends(monkeypatch, new_api: bool):
    from types import SimpleNamespace

    flags = {"fp32_precision": "ieee"} if new_api else {}
    matmul, conv = SimpleNamespace(**flags), SimpleNamespace(**flags)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends.cudnn, "conv", conv, raising=False)
    if not new_api:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return matmul, conv


def test_fp32_on_cuda_allows_tf32_through_the_precision_api(monkeypatch):
    matmul, conv = _backends(monkeypatch, new_api=True)
    configure_math(torch.device("cuda", 0), "fp32")
    # the legacy allow_tf32 switches warn on current torch: none of them is touched
    assert vars(matmul) == {"fp32_precision": "tf32"} and vars(conv) == {"fp32_precision": "tf32"}


def test_tf32_falls_back_to_the_legacy_switches_on_older_torch(monkeypatch):
    matmul, _ = _backends(monkeypatch, new_api=False)
    configure_math(torch.device("cuda", 0), "fp32")
    assert matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True


def test_tf32_only_for_fp32_on_cuda(monkeypatch):
    matmul, conv = _backends(monkeypatch, new_api=True)
    configure_math(torch.device("cpu"), "fp32")
    configure_math(torch.device("cuda", 0), "bf16")
    assert matmul.fp32_precision == conv.fp32_precision == "ieee"
