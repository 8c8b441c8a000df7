"""Data pipeline: corpus reading, tokenization cache, token-based batching and prefetching.

Names are imported on first use, so that the encoding worker processes (which import
``nmt.data.encode``) do not load torch through ``batching``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "batching",
    "TokenBatchSampler": "batching",
    "collate": "batching",
    "padding_efficiency": "batching",
    "corpus_fingerprint": "corpus",
    "iter_split": "corpus",
    "read_split": "corpus",
    "Prefetcher": "prefetch",
    "ParallelData": "store",
    "PreparedData": "store",
    "TokenArray": "store",
    "prepare_data": "prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nmt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nmt.data.{_EXPORTS[name]}"), name)
