"""Cleaning rules of the training pairs (empty sides, length limits) and of the loss targets of
the validation and test splits (truncation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nmt.data.store import TokenArray


def clean_pairs(src: Sequence[str | None], tgt: Sequence[str | None],
                mono: bool = False) -> tuple[list[str], list[str], int, int]:
    """Strip both sides; drop pairs where either side is empty (``mono``: where both are, as one
    side of monolingual text always is), or unreadable (None: a line over ``data.max_line_bytes``
    or with a NUL byte). Returns (src, tgt, n_empty, n_unreadable)."""
    readable = [(s, t) for s, t in zip(src, tgt, strict=True) if s is not None and t is not None]
    stripped = ((s.strip(), t.strip()) for s, t in readable)
    pairs = [(s, t) for s, t in stripped if (s or t if mono else s and t)]
    kept_src = [s for s, _ in pairs]
    kept_tgt = [t for _, t in pairs]
    return kept_src, kept_tgt, len(readable) - len(pairs), len(src) - len(readable)


def length_filter(src_lens: np.ndarray, tgt_lens: np.ndarray, max_len: int,
                  max_ratio: float) -> tuple[np.ndarray, int, int]:
    """Keep mask, number over ``max_len`` on either side, number over the length ratio."""
    too_long = (src_lens > max_len) | (tgt_lens > max_len)
    longer = np.maximum(src_lens, tgt_lens)
    shorter = np.maximum(np.minimum(src_lens, tgt_lens), 1)
    bad_ratio = ~too_long & (longer > max_ratio * shorter)
    keep = ~(too_long | bad_ratio)
    return keep, int(too_long.sum()), int(bad_ratio.sum())


def truncate_pairs(src: TokenArray, tgt: TokenArray, max_len: int) -> tuple[TokenArray, TokenArray, int]:
    """Both sides cut to ``max_len`` tokens (for the loss: decoding reads the raw text), and the
    number of pairs cut."""
    too_long = (src.lengths() > max_len) | (tgt.lengths() > max_len)
    return src.truncate(max_len), tgt.truncate(max_len), int(too_long.sum())
