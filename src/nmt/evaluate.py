"""Corpus BLEU, chrF and TER with sacreBLEU, with the signatures that make scores comparable.

The BLEU tokenizer follows the target language as the sacreBLEU CLI picks it (``zh`` -> "zh",
``ja`` -> "ja-mecab", ``ko`` -> "ko-mecab", else "13a"); when the MeCab packages a language needs
are not installed, "13a" is used with a warning (the signature records the tokenizer either way).
``lowercase`` applies to all three metrics (TER is case-sensitive unless it is set).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.errors import NMTError

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
