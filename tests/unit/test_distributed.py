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
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda backend: calls.append(("control", backend)) or "gloo-group")
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
