"""Translate raw text lines with a model and its tokenizer, streaming in bounded memory.

Lines are read ``chunk_lines`` at a time; within a chunk they are sorted by length into batches
of at most ``decode_cfg.batch_tokens`` source tokens (padding included; a single longer sentence
still forms its own batch) and results come back in input order. Empty (or whitespace-only) lines
give empty outputs without touching the model. Source lines longer than the model's
``max_positions`` subword tokens (EOS included) are truncated to fit, so they get a translation of
their beginning instead of an error.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from nmt.config import DecodeConfig
from nmt.decoding import Hypothesis, beam_search, greedy_search, model_max_positions, sample_search
from nmt.errors import NMTError
from nmt.runtime import AUTOCAST_DTYPES, autocast_context
from nmt.tokenizer import EOS_ID, PAD_ID

SEARCHES = ("beam", "greedy", "sample")
PRECISIONS = ("fp32", *AUTOCAST_DTYPES)


@dataclass
class Translation:
    """Output for one input line: best text, its score, and all returned (text, score) pairs."""

    text: str
    score: float
    nbest: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class SamplingOptions:
    """Settings used when ``search="sample"``."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1


def translate_lines(model, tokenizer, lines: Iterable[str], decode_cfg: DecodeConfig,
                    device: str | torch.device = "cpu", precision: str = "fp32",
                    search: str = "beam", *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 1, with_scores: bool = False,
                    chunk_lines: int = 10_000, max_src_len: int | None = None) -> Iterator[str]:
    """Yield the translation of each input line as text, in input order.

    With ``with_scores`` each hypothesis reads ``"{score:.4f}\t{text}"``. With ``decode_cfg.nbest``
    > 1 (beam search) an item holds that many hypotheses, best first, joined by newlines.
    """
    sampling = SamplingOptions(temperature, top_k, top_p, seed)
    for result in translate(model, tokenizer, lines, decode_cfg, device, precision, search, sampling,
                            chunk_lines, max_src_len):
        if with_scores:
            yield "\n".join(f"{score:.4f}\t{text}" for text, score in result.nbest)
        else:
            yield "\n".join(text for text, _ in result.nbest)


def translate(model, tokenizer, lines: Iterable[str], decode_cfg: DecodeConfig,
              device: str | torch.device = "cpu", precision: str = "fp32", search: str = "beam",
              sampling: SamplingOptions | None = None, chunk_lines: int = 10_000,
              max_src_len: int | None = None) -> Iterator[Translation]:
    """Yield one Translation per input line, in input order.

    ``search="beam"`` with ``decode_cfg.beam == 1`` runs greedy search (same result, cheaper).
    ``max_src_len`` defaults to the model's max positions (no limit if it exposes none).
    The model is put in eval mode while a chunk is decoded and restored afterwards.
    """
    if search not in SEARCHES:
        raise NMTError(f"unknown search {search!r}; choose one of: {', '.join(SEARCHES)}")
    if precision not in PRECISIONS:
        raise NMTError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if chunk_lines < 1:
        raise NMTError(f"chunk_lines must be >= 1, got {chunk_lines}")
    device = torch.device(device)
    sampling = sampling or SamplingOptions()
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    ctx = _Context(model, tokenizer, decode_cfg, device, precision, search, sampling, generator,
                   max_src_len if max_src_len is not None else model_max_positions(model))
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, chunk_lines)):
        yield from _translate_chunk(ctx, chunk)


@dataclass
class _Context:
    model: torch.nn.Module
    tokenizer: object
    cfg: DecodeConfig
    device: torch.device
    precision: str
    search: str
    sampling: SamplingOptions
    generator: torch.Generator
    max_src_len: int | None


def _translate_chunk(ctx: _Context, chunk: list[str]) -> list[Translation]:
    """Translations of one chunk of lines, in the chunk's order."""
    texts = [line.rstrip("\r\n") for line in chunk]
    n_hyps = ctx.cfg.nbest if ctx.search == "beam" and ctx.cfg.beam > 1 else 1
    results = [Translation("", 0.0, [("", 0.0)] * n_hyps) for _ in texts]
    todo = [i for i, text in enumerate(texts) if text.strip()]
    if not todo:
        return results
    sources = [_with_eos(ids, ctx.max_src_len)
               for ids in ctx.tokenizer.encode_src([texts[i] for i in todo])]
    with _eval_mode(ctx.model):
        for batch in length_batches([len(s) for s in sources], ctx.cfg.batch_tokens):
            nbests = _decode_batch(ctx, [sources[j] for j in batch])
            flat = ctx.tokenizer.decode_tgt([h.tokens for hyps in nbests for h in hyps])
            outputs = iter(zip(flat, (h.score for hyps in nbests for h in hyps), strict=True))
            for j, hyps in zip(batch, nbests, strict=True):
                pairs = [next(outputs) for _ in hyps]
                results[todo[j]] = Translation(pairs[0][0], pairs[0][1], pairs)
    return results


def _with_eos(ids: list[int], max_len: int | None) -> list[int]:
    """Source ids with EOS appended, truncated so that the whole sequence fits in ``max_len``."""
    if max_len is not None:
        ids = ids[: max(max_len - 1, 0)]
    return [*ids, EOS_ID]


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first; B * max_len <= batch_tokens.

    A sentence longer than ``batch_tokens`` gets a batch of its own rather than an error.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # Sorted descending, so a batch's first sentence is its longest (its padded width).
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _decode_batch(ctx: _Context, sources: list[list[int]]) -> list[list[Hypothesis]]:
    """Run the configured search on one batch of source id lists (each ending with EOS)."""
    src = pad_sequence([torch.tensor(s, dtype=torch.long) for s in sources], batch_first=True,
                       padding_value=PAD_ID).to(ctx.device)  # [B, S]
    mask = src == PAD_ID
    with autocast_context(ctx.device, ctx.precision):
        return _search(ctx, src, mask)


def _search(ctx: _Context, src: Tensor, mask: Tensor) -> list[list[Hypothesis]]:
    cfg, model = ctx.cfg, ctx.model
    limits = {"max_len_a": cfg.max_len_a, "max_len_b": cfg.max_len_b, "min_len": cfg.min_len,
              "no_repeat_ngram": cfg.no_repeat_ngram}
    if ctx.search == "beam" and cfg.beam > 1:
        return beam_search(model, src, mask, beam=cfg.beam, lenpen=cfg.lenpen, nbest=cfg.nbest, **limits)
    if ctx.search == "sample":
        s = ctx.sampling
        hyps = sample_search(model, src, mask, temperature=s.temperature, top_k=s.top_k,
                             top_p=s.top_p, generator=ctx.generator, **limits)
    else:
        hyps = greedy_search(model, src, mask, **limits)
    return [[h] for h in hyps]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
