from __future__ import annotations

import torch
import torch.distributed as dist

from nmt import distributed as D


def test_each_cuda_rank_binds_its_own_gpu_before_joining(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda backend, **kw: calls.append(("control", backend)) or "gloo-group")
    info = D.init_distributed("cuda")
    assert calls == [("set_device", 1), ("init", "nccl"), ("control", "gloo")]
    assert (info.rank, info.world_size, info.local_rank, info.control) == (1, 2, 1, "gloo-group")


def test_ddp_does_not_broadcast_buffers(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = D.wrap(torch.nn.Linear(2, 2), torch.device("cpu"))
        assert getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers) is False
    finally:
        dist.destroy_process_group()


def _fake_group(monkeypatch, calls, backend):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_backend", lambda: backend)
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("control", kw)) or "gloo-group")


def test_the_timeout_reaches_every_group_and_cuda_names_its_device(monkeypatch):
    from datetime import timedelta

    calls = []
    _fake_group(monkeypatch, calls, "nccl")

    def init_process_group(backend, timeout=None, device_id=None):
        calls.append(("init", {"backend": backend, "timeout": timeout, "device_id": device_id}))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    D.init_distributed("cuda", timeout_minutes=90)
    assert calls == [("init", {"backend": "nccl", "timeout": timedelta(minutes=90), "device_id": torch.device("cuda", 0)}),
                     ("control", {"backend": "gloo", "timeout": timedelta(minutes=90)})]


def test_torch_without_device_id_still_joins(monkeypatch):
    calls = []
    _fake_group(monkeypatch, calls, "nccl")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout=None: calls.append(("init", backend)))
    D.init_distributed("cuda", timeout_minutes=5)
    assert calls[0] == ("init", "nccl")
    calls.clear()
    _fake_group(monkeypatch, calls, "gloo")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout=None, device_id=None: calls.append(
        ("init", backend, device_id)))
    D.init_distributed("cpu", timeout_minutes=5)
    assert calls == [("init", "gloo", None)]  # no device on the CPU; gloo is the control group itself

def test_ddp_gradients_are_views_of_its_buckets(tmp_path):
    # no copy between each gradient and its communication bucket
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert D.wrap(torch.nn.Linear(2, 2), torch.device("cpu")).gradient_as_bucket_view is True
    finally:
        dist.destroy_process_group()
