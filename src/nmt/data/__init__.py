"""Data pipeline: corpus reading, tokenization cache and token-based batching."""

from __future__ import annotations

from nmt.data.batching import Batch, TokenBatchSampler, collate, padding_efficiency
from nmt.data.corpus import corpus_fingerprint, read_split
from nmt.data.prepare import ParallelData, PreparedData, TokenArray, prepare_data

__all__ = [
    "Batch",
    "ParallelData",
    "PreparedData",
    "TokenArray",
    "TokenBatchSampler",
    "collate",
    "corpus_fingerprint",
    "padding_efficiency",
    "prepare_data",
    "read_split",
]
