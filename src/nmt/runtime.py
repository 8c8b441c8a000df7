"""The process a command computes in: its device, math settings, autocast and memory allocator."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import torch

from nmt.errors import NMTError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` as a device: this process's GPU (``local_rank``) when CUDA is chosen."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise NMTError("train.device=cuda but no CUDA device is available; use train.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def configure_math(device: torch.device, precision: str) -> None:
    """fp32 runs on CUDA use TF32 tensor cores for matmuls and convolutions (10-bit mantissa
    products, fp32 accumulation), as fp32 training on Ampere and later usually does. On the CPU the
    same switch would allow bf16 matmuls in oneDNN, so it is left alone there."""
    if device.type != "cuda" or precision != "fp32":
        return
    # the fp32_precision switches where torch has them: the allow_tf32 ones are deprecated there
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    if hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True


def autocast_context(device: torch.device, precision: str):
    """Autocast to ``precision`` (bf16, fp16) on ``device``; no autocast for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it.

    A training step allocates and frees many activation tensors of a few MiB. By default glibc
    serves each from a fresh mmap and returns it on free, so every step pays for page faults in
    the kernel, a large share of a CPU training step. Only worth it where the CPU computes
    (the CLI without CUDA, training with train.device=cpu): with a GPU the host's own allocations
    are few and the held memory is wasted. Returns whether the settings took.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest threshold glibc accepts on 64-bit
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    ok &= mallopt(_M_TOP_PAD, 64 << 20)
    return bool(ok)
