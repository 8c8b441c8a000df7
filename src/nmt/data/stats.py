"""Statistics of a prepared corpus: what ``meta.json`` records and the lines ``nmt prepare`` prints."""

from __future__ import annotations

from typing import Any

from nmt.config import Config
from nmt.data.cache import tokenizer_settings
from nmt.data.store import ParallelData
from nmt.tokenizer import Tokenizer


def build_meta(cfg: Config, tokenizer: Tokenizer, splits: dict[str, ParallelData], n_read: int,
               dropped: dict[str, int], truncated: dict[str, int], cache_format: int) -> dict[str, Any]:
    return {
        "format": cache_format,
        "splits": list(splits),
        "dtype": splits["train"].src.data.dtype.name,
        "tokenizer": tokenizer_settings(cfg.tokenizer),
        "vocab": {"src": tokenizer.src_vocab_size, "tgt": tokenizer.tgt_vocab_size},
        "train_read": n_read,
        "dropped": dropped,
        "truncated": truncated,
        "cleaning": {"max_len": cfg.data.max_len, "max_len_ratio": cfg.data.max_len_ratio,
                     "max_line_bytes": cfg.data.max_line_bytes},
        "pairs": {n: len(p) for n, p in splits.items()},
        "tokens": {n: [int(p.src.offsets[-1]), int(p.tgt.offsets[-1])] for n, p in splits.items()},
    }


def stats_lines(meta: dict[str, Any]) -> list[str]:
    drop, clean = meta["dropped"], meta["cleaning"]
    lines = [
        f"train: kept {meta['pairs']['train']} of {meta['train_read']} pairs; dropped "
        f"{drop['empty']} empty, {drop['max_len']} over data.max_len={clean['max_len']}, "
        f"{drop['max_len_ratio']} over data.max_len_ratio={clean['max_len_ratio']}"
        + (f", {drop['unreadable']} with a line over data.max_line_bytes={clean['max_line_bytes']} or "
           "holding a NUL byte" if drop.get("unreadable") else ""),
        f"vocab: src {meta['vocab']['src']}, tgt {meta['vocab']['tgt']} "
        f"({'joint' if meta['tokenizer']['joint'] else 'separate'} {meta['tokenizer']['model_type']})",
    ]
    for name, (n_src, n_tgt) in meta["tokens"].items():
        cut = meta["truncated"].get(name, 0)
        note = f"; {cut} longer than data.max_len={clean['max_len']} cut to it for the loss" if cut else ""
        lines.append(f"{name}: {meta['pairs'][name]} pairs, {n_src} src / {n_tgt} tgt tokens{note}")
    return lines
