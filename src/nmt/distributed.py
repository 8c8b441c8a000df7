"""torchrun / DistributedDataParallel plumbing; a no-op in a single process."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None
    """Process group for small host-side decisions (gloo, CPU tensors): agreeing on them never waits
    for the GPU's queue. None: the default group (already gloo on the CPU)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_minutes: float = 60.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA);
    a collective that waits longer than ``timeout_minutes`` fails the run.

    On CUDA each process binds its own GPU first, so NCCL and ``empty_cache`` never touch GPU 0
    from every rank, and names it to the group (``device_id``, where torch has it) so that NCCL
    connects at once to the right GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(minutes=timeout_minutes)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        options: dict[str, Any] = {"timeout": timeout}
        if device_type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            options["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", **options)
    control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    return DistInfo(int(os.environ["RANK"]), world_size, local_rank, control)


def wrap(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP around ``module``. No buffer of the model is trained (positional tables, masks), so
    nothing is broadcast before each forward (newer torch names the switch forward_sync_buffers).
    The gradients are views into DDP's communication buckets: no copy between the two, and no
    second copy of every gradient in memory."""
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_sync)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.control)


def any_rank(flags: list[bool], info: DistInfo, device: torch.device | None = None) -> list[bool]:
    """Element-wise OR of ``flags`` over ranks, so every rank takes the same decisions.

    Runs on the CPU control group: the answer never waits for queued GPU work.
    """
    if not info.enabled:
        return list(flags)
    t = torch.tensor(flags, dtype=torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control)
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(value: float, info: DistInfo) -> float:
    """A host number summed over ranks (on the CPU control group)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.control)
    return float(t[0])


def all_reduce_sum_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.control)
    return out


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
