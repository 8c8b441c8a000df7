"""Process-wide runtime settings applied once at start-up."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it.

    A training step allocates and frees many activation tensors of a few MiB. By default glibc
    serves each from a fresh mmap and returns it on free, so every step pays for page faults in
    the kernel; on a 2-core CPU that doubled the step time. Only worth it where the CPU computes
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
