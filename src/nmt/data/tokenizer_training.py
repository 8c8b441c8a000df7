"""SentencePiece trained on the cleaned training split, streamed, in a process of its own for
large corpora."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from nmt.config import Config
from nmt.data.clean import clean_pairs
from nmt.data.corpus import Side, iter_split, mono_side
from nmt.data.pool import run_apart
from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer

APART_MIN = 20_000  # training pairs above which SentencePiece trains in a process of its own


def tokenizer_side(cfg: Config) -> Side:
    """The text the tokenizer reads: the task's monolingual side, or the whole parallel corpus
    (None) for a translation run or ``tokenizer.text: pair``."""
    return None if cfg.tokenizer.text == "pair" else mono_side(cfg)


def train_tokenizer(cfg: Config) -> Tokenizer:
    """SentencePiece on a sample of the cleaned training split, streamed. A corpus of more than
    one chunk is sampled and trained in a process of its own: SentencePiece's memory (its sample
    and training state) then goes back to the system, instead of staying in this process's heap
    under the encoding that follows."""
    if next(itertools.islice(iter_split(cfg.data, "train", chunk=APART_MIN, side=tokenizer_side(cfg)), 1, None), None) is None:
        return train_here(cfg)
    return Tokenizer.from_state(run_apart(
        "training the tokenizer", "free memory or lower tokenizer.input_sentence_size", _tokenizer_state, cfg))


def _tokenizer_state(cfg: Config) -> dict[str, bytes]:
    return train_here(cfg).to_state()


def train_here(cfg: Config) -> Tokenizer:
    """``train_tokenizer`` in this process."""
    counts = {"kept": 0, "empty": 0}
    errors: list[BaseException] = []  # SentencePiece would swallow an exception of the reader

    def chunks() -> Iterator[tuple[list[str], list[str]]]:
        counts.update(kept=0, empty=0)
        try:
            side = tokenizer_side(cfg)
            for src, tgt in iter_split(cfg.data, "train", side=side):
                src, tgt, n_empty, _ = clean_pairs(src, tgt, mono=side is not None)
                counts["kept"] += len(src)
                counts["empty"] += n_empty
                yield src, tgt
        except Exception as e:
            errors.append(e)

    try:
        tokenizer = Tokenizer.train_streaming(chunks, cfg.tokenizer, mask=cfg.task == "mlm")
    except NMTError:
        if errors:
            raise errors[0] from None
        if counts["kept"] == 0:
            raise NMTError(f"training corpus is empty after cleaning ({counts['empty']} empty pairs "
                           "dropped)") from None
        raise
    if errors:
        raise errors[0]
    return tokenizer
