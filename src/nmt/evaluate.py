"""Corpus BLEU, chrF and TER with sacreBLEU, with the signatures that make scores comparable, and a
model's validation scores (``evaluate_model``).

The BLEU tokenizer follows the target language as the sacreBLEU CLI picks it (``zh`` -> "zh",
``ja`` -> "ja-mecab", ``ko`` -> "ko-mecab", else "13a"); when the MeCab packages a language needs
are not installed, "13a" is used with a warning (the signature records the tokenizer either way).
``lowercase`` applies to all three metrics (TER is case-sensitive unless it is set).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.errors import NMTError

if TYPE_CHECKING:
    import torch

    from nmt.config import Config
    from nmt.data.batching import Batch
    from nmt.data.prepare import ParallelData, PreparedData

METRICS = ("bleu", "chrf", "ter")
LANGUAGE_TOKENIZERS = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}
DEFAULT_TOKENIZER = "13a"


@functools.cache
def _tokenizer_available(name: str) -> bool:
    try:
        BLEU(tokenize=name)
    except (RuntimeError, ImportError, AssertionError):  # missing MeCab package or dictionary
        return False
    return True


def bleu_tokenizer_for(tgt_lang: str) -> str:
    """sacreBLEU tokenizer for a target language code such as "de", "zh-CN" or "ja"."""
    base = tgt_lang.lower().replace("_", "-").split("-")[0]
    name = LANGUAGE_TOKENIZERS.get(base, DEFAULT_TOKENIZER)
    if name != DEFAULT_TOKENIZER and not _tokenizer_available(name):
        warnings.warn(f"BLEU tokenizer {name!r} for {tgt_lang!r} is not installed "
                      f"(pip install sacrebleu[{base}]); using {DEFAULT_TOKENIZER!r}", stacklevel=2)
        return DEFAULT_TOKENIZER
    return name


def _bleu(tokenize: str | None, tgt_lang: str, lowercase: bool) -> BLEU:
    name = tokenize if tokenize is not None else bleu_tokenizer_for(tgt_lang)
    if name not in BLEU.TOKENIZERS:
        raise NMTError(f"unknown BLEU tokenizer {name!r}; choose one of: {', '.join(BLEU.TOKENIZERS)}")
    try:
        return BLEU(tokenize=name, lowercase=lowercase)
    except (RuntimeError, ImportError, AssertionError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise NMTError(f"BLEU tokenizer {name!r} is unavailable: {first.strip()}") from None


def score_streams(hyps: Sequence[str], ref_streams: Sequence[Sequence[str]], tgt_lang: str = "",
                  lowercase: bool = False, tokenize: str | None = None,
                  metrics: Sequence[str] = METRICS) -> dict:
    """Scores against one or more reference streams (each as long as ``hyps``).

    Returns ``{metric: float, ..., "signature": {metric: str, ...}}`` for the requested metrics.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise NMTError(f"unknown metric {unknown[0]!r}; choose from: {', '.join(METRICS)}")
    if not ref_streams:
        raise NMTError("no references to score against")
    for refs in ref_streams:
        if len(refs) != len(hyps):
            raise NMTError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise NMTError("nothing to score: no hypotheses")
    scorers = {"bleu": lambda: _bleu(tokenize, tgt_lang, lowercase),
               "chrf": lambda: CHRF(lowercase=lowercase),
               "ter": lambda: TER(case_sensitive=not lowercase)}
    result: dict = {}
    signatures: dict[str, str] = {}
    hyps, ref_streams = list(hyps), [list(r) for r in ref_streams]
    for name in metrics:
        metric = scorers[name]()
        result[name] = float(metric.corpus_score(hyps, ref_streams).score)
        signatures[name] = str(metric.get_signature())
    return {**result, "signature": signatures}


def score(hyps: Sequence[str], refs: Sequence[str], tgt_lang: str = "", lowercase: bool = False,
          tokenize: str | None = None) -> dict:
    """BLEU, chrF and TER of detokenized hypotheses against one reference per line.

    Returns ``{"bleu", "chrf", "ter": float, "signature": {"bleu", "chrf", "ter": str}}``.
    """
    return score_streams(hyps, [refs], tgt_lang, lowercase, tokenize)


def format_scores(scores: dict) -> str:
    """One readable line, e.g. ``BLEU 27.31 | chrF2 55.02 | TER 60.10 | nrefs:1|case:mixed|...``."""
    labels = {"bleu": "BLEU", "chrf": "chrF2", "ter": "TER"}
    parts = [f"{labels[m]} {scores[m]:.2f}" for m in METRICS if m in scores]
    signatures = scores.get("signature", {})
    first = next((signatures[m] for m in METRICS if m in signatures), None)
    if first is not None:
        parts.append(first)
    return " | ".join(parts)


def evaluate_model(model, data: PreparedData, cfg: Config, device: torch.device) -> dict[str, float]:
    """Validation metrics of ``cfg.task``: teacher-forced NLL per token and its perplexity; for
    translation also the detokenized BLEU/chrF of the decoded split (a language model decodes
    nothing on validation: its perplexity is its score)."""
    was_training = model.training
    model.eval()
    loss = validation_nll(model, data.valid, cfg, device)
    result = {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50))}
    if cfg.task == "translation":
        result.update(_translation_scores(model, data, cfg, device))
    model.train(was_training)
    return result


def validation_nll(model, valid: ParallelData, cfg: Config, device: torch.device) -> float:
    """Teacher-forced NLL per target token of ``valid`` (no label smoothing).

    torch and the model code are imported here: scoring text files needs neither.
    """
    import torch

    from nmt.loss import Objective
    from nmt.runtime import autocast_context

    objective = Objective(model, 0.0)
    nll, tokens = torch.zeros((), device=device), 0  # summed on the device: one host sync at the end
    with torch.inference_mode(), autocast_context(device, cfg.train.precision):
        for batch in iter_batches(valid, cfg.train.batch_tokens):
            batch = batch.to(device)
            nll += objective(batch.src, batch.tgt_in, batch.tgt_positions, batch.targets())[1]
            tokens += batch.n_tgt_tokens
    return float(nll) / max(tokens, 1)


def _translation_scores(model, data: PreparedData, cfg: Config, device: torch.device) -> dict[str, float]:
    """BLEU and chrF of the validation split decoded with ``train.valid_beam``."""
    import torch

    from nmt.translate import translate_lines

    valid = data.valid
    limit = cfg.data.max_valid_sentences or len(valid.src_text)
    search = "greedy" if cfg.train.valid_beam == 1 else "beam"
    decode_cfg = replace(cfg.decode, beam=cfg.train.valid_beam, nbest=1)
    with torch.inference_mode():
        hyps = list(translate_lines(model, data.tokenizer, valid.src_text[:limit], decode_cfg, device,
                                    cfg.train.precision, search=search))
    scores = score(hyps, valid.tgt_text[:limit], cfg.data.tgt_lang)
    return {"valid_bleu": scores["bleu"], "valid_chrf": scores["chrf"]}


def iter_batches(data: ParallelData, batch_tokens: int) -> Iterator[Batch]:
    """``data`` in token-bounded batches, in corpus order."""
    from nmt.data.batching import TokenBatchSampler, collate

    sampler = TokenBatchSampler(data.src.lengths(), data.tgt.lengths(), batch_tokens, seed=0, shuffle=False)
    for indices in sampler:
        yield collate(data, indices)
