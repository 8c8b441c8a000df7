"""SentencePiece subword tokenizer: joint or separate source/target models with fixed special ids."""

from __future__ import annotations

import io
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nmt.config import TokenizerConfig
from nmt.errors import NMTError
from nmt.special import BOS_ID, EOS_ID, MASK_PIECE, PAD_ID, SPECIAL_IDS, UNK_ID  # noqa: F401 (callers import them from here too)

_LAYOUTS = {True: ("joint",), False: ("src", "tgt")}  # model files of a joint / separate tokenizer
_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


class Tokenizer:
    """Encodes source/target text to subword ids and back; one shared model when ``joint``."""

    def __init__(self, protos: dict[str, bytes]) -> None:
        if set(protos) == {"joint"}:
            self.joint = True
            self._src = self._tgt = _processor(protos["joint"])
        elif set(protos) == {"src", "tgt"}:
            self.joint = False
            self._src, self._tgt = _processor(protos["src"]), _processor(protos["tgt"])
        else:
            raise NMTError(f"tokenizer state must have keys 'joint' or 'src'+'tgt', got {sorted(protos)}")
        self._protos = dict(protos)
        self._samplers: dict[str, BpeDropout] = {}
        self.src_vocab_size: int = self._src.get_piece_size()
        self.tgt_vocab_size: int = self._tgt.get_piece_size()
        mask = self._src.piece_to_id(MASK_PIECE)
        self.mask_id: int | None = mask if self._src.id_to_piece(mask) == MASK_PIECE else None
        """The source side's ``<mask>`` id (task mlm tokenizers), else None."""

    @classmethod
    def train(
        cls, src_lines: list[str], tgt_lines: list[str], cfg: TokenizerConfig, seed: int = 1,
        mask: bool = False,
    ) -> Tokenizer:
        """Train SentencePiece on in-memory sentences (no temporary files)."""
        return cls.train_streaming(lambda: iter([(src_lines, tgt_lines)]), cfg, seed, mask)

    @classmethod
    def train_streaming(
        cls, chunks: Callable[[], Iterator[tuple[list[str], list[str]]]], cfg: TokenizerConfig,
        seed: int = 1, mask: bool = False,
    ) -> Tokenizer:
        """Train SentencePiece on a stream of (source, target) chunks; ``chunks()`` starts a pass.

        SentencePiece keeps a uniform sample of ``cfg.input_sentence_size`` sentences as they come
        (reservoir sampling), so memory is bounded by the sample, not by the corpus. A joint model
        reads both sides in one pass; separate models read the corpus once per side. ``mask``
        reserves ``<mask>`` (id 4) in the source (or joint) model, for masked-LM pre-training.
        """
        symbols = [MASK_PIECE] if mask else []
        if cfg.joint:
            # the empty side of monolingual text is no sentence to sample
            both = (line for src, tgt in chunks() for pair in zip(src, tgt, strict=True) for line in pair if line)
            return cls({"joint": _train_model(both, cfg, seed, symbols)})
        src = _train_model((line for src, _ in chunks() for line in src), cfg, seed, symbols)
        tgt = _train_model((line for _, tgt in chunks() for line in tgt), cfg, seed)
        return cls({"src": src, "tgt": tgt})

    def encode_src(self, lines: Sequence[str], threads: int = 0) -> list[list[int]]:
        """Subword ids of each line, without BOS/EOS, on ``threads`` threads (0 = all cores)."""
        return _encode(self._src, lines, threads)

    def encode_tgt(self, lines: Sequence[str], threads: int = 0) -> list[list[int]]:
        return _encode(self._tgt, lines, threads)

    def sample_src(self, lines: Sequence[str], alpha: float, rng: np.random.Generator) -> list[list[int]]:
        """Subword ids of each line, with BPE-dropout (each candidate merge dropped with
        probability ``alpha``), drawn from ``rng``: the same generator state gives the same ids."""
        return self._sampler("src").encode(lines, alpha, rng)

    def sample_tgt(self, lines: Sequence[str], alpha: float, rng: np.random.Generator) -> list[list[int]]:
        return self._sampler("tgt").encode(lines, alpha, rng)

    def _sampler(self, side: str) -> BpeDropout:
        if side not in self._samplers:
            self._samplers[side] = BpeDropout(self._src if side == "src" else self._tgt)
        return self._samplers[side]

    def decode_src(self, ids: Iterable[Sequence[int]]) -> list[str]:
        return _decode(self._src, ids)

    def decode_tgt(self, ids: Iterable[Sequence[int]]) -> list[str]:
        """Detokenized text of each id sequence; PAD/BOS/EOS ids are dropped."""
        return _decode(self._tgt, ids)

    def src_pieces(self, line: str) -> list[str]:
        return self._src.encode(line, out_type=str)

    def tgt_pieces(self, line: str) -> list[str]:
        return self._tgt.encode(line, out_type=str)

    def to_state(self) -> dict[str, bytes]:
        """Serialized model(s): ``{"joint": b"..."}`` or ``{"src": b"...", "tgt": b"..."}``."""
        return dict(self._protos)

    @classmethod
    def from_state(cls, state: dict[str, bytes]) -> Tokenizer:
        return cls({k: bytes(v) for k, v in state.items()})

    def save(self, directory: Path | str) -> None:
        """Write ``<name>.model`` files, each replaced atomically, and remove the other layout's
        (``joint.model`` or ``src.model`` + ``tgt.model``): a reused folder never holds a stale model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, proto in self._protos.items():
            _atomic_write(directory / f"{name}.model", proto)
        for name in _LAYOUTS[not self.joint]:
            (directory / f"{name}.model").unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path | str, joint: bool | None = None) -> Tokenizer:
        """The tokenizer saved in ``directory``: the layout ``joint`` says (``tokenizer.joint``), or
        with None the one layout present (an error if both are)."""
        directory = Path(directory)
        if joint is None:
            present = [j for j in (True, False) if (directory / f"{_LAYOUTS[j][0]}.model").is_file()]
            if len(present) > 1:
                raise NMTError(f"{directory} holds both a joint and separate tokenizer models; "
                               "say which with tokenizer.joint")
            joint = present[0] if present else False
        paths = {name: directory / f"{name}.model" for name in _LAYOUTS[joint]}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise NMTError(f"no tokenizer in {directory}: missing {missing[0]}")
        return cls({name: path.read_bytes() for name, path in paths.items()})


class BpeDropout:
    """BPE-dropout (Provilkov et al. 2020) on a SentencePiece BPE model, drawn from a numpy
    generator: SentencePiece's own sampling takes its random numbers from a per-process source that
    its seed does not fix, and the cache must be the same bytes on every build.

    Each word (a ``▁`` and the characters up to the next one, after SentencePiece's normalization)
    starts as characters; each step merges the adjacent pair whose concatenation is the piece of
    highest score, among the pairs not dropped in that step (each with probability ``alpha``); it
    stops when no pair is left. With ``alpha`` 0 this is SentencePiece's own BPE encoding: symbols
    outside the vocabulary become one unknown id per run, as SentencePiece does."""

    def __init__(self, sp: spm.SentencePieceProcessor) -> None:
        self._sp, self._unk = sp, sp.unk_id()
        normal = [i for i in range(sp.get_piece_size())
                  if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]
        self._ids = {sp.id_to_piece(i): i for i in normal}
        self._score = {sp.id_to_piece(i): sp.get_score(i) for i in normal}

    def encode(self, lines: Sequence[str], alpha: float, rng: np.random.Generator) -> list[list[int]]:
        out = []
        for line in lines:
            words = list(_words(self._sp.normalize(line)))
            # a word of n symbols takes at most n - 1 steps of at most n - 1 draws: all drawn at once
            draws = iter((rng.random(sum((len(w) - 1) ** 2 for w in words)) < alpha).tolist())
            ids: list[int] = []
            for word in words:
                self._append(self._merge(list(word), draws), ids)
            out.append(ids)
        return out

    def _merge(self, symbols: list[str], dropped: Iterator[bool]) -> list[str]:
        score = self._score
        while len(symbols) > 1:
            best, best_score = -1, -math.inf
            for j in range(len(symbols) - 1):
                drop = next(dropped)
                s = score.get(symbols[j] + symbols[j + 1])
                if s is not None and s > best_score and not drop:
                    best, best_score = j, s
            if best < 0:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        return symbols

    def _append(self, symbols: list[str], ids: list[int]) -> None:
        for symbol in symbols:
            i = self._ids.get(symbol, self._unk)
            if not (i == self._unk and ids and ids[-1] == self._unk):
                ids.append(i)


def _words(text: str) -> Iterator[str]:
    """``text`` cut before each ``▁``: BPE pieces never span one."""
    start = 0
    for j in range(1, len(text)):
        if text[j] == "\u2581":
            yield text[start:j]
            start = j
    if text:
        yield text[start:]


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _processor(proto: bytes) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        raise NMTError(f"invalid SentencePiece model: {str(e).splitlines()[0]}") from None


def _train_model(sentences: Iterable[str], cfg: TokenizerConfig, seed: int, symbols: Sequence[str] = ()) -> bytes:
    if 0 < cfg.input_sentence_size <= 100:  # SentencePiece rejects small samples
        raise NMTError(f"tokenizer.input_sentence_size must be 0 (all) or > 100, "
                       f"got {cfg.input_sentence_size}")
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=writer,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            hard_vocab_limit=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=list(symbols),
            num_threads=cpu_count(),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(str(e), cfg) from None
    return writer.getvalue()


def _training_error(message: str, cfg: TokenizerConfig) -> NMTError:
    """Turn SentencePiece's internal check failures into one-line user errors."""
    if m := _TOO_LARGE.search(message):
        return NMTError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too large for this corpus; try <= {m.group(2)}"
        )
    if m := _TOO_SMALL.search(message):
        return NMTError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for the characters of this corpus; "
            f"use >= {m.group(2)} or lower tokenizer.character_coverage"
        )
    if "sentences_.empty()" in message:
        return NMTError("no sentences to train the tokenizer on")
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return NMTError(f"SentencePiece training failed: {first}")


def _encode(sp: spm.SentencePieceProcessor, lines: Sequence[str], threads: int = 0) -> list[list[int]]:
    if not lines:
        return []
    # encode(list) runs on SentencePiece's own thread pool.
    return sp.encode(list(lines), out_type=int, num_threads=threads or cpu_count())


def _decode(sp: spm.SentencePieceProcessor, ids: Iterable[Sequence[int]]) -> list[str]:
    rows = ids.tolist() if hasattr(ids, "tolist") else ids
    clean = [[int(i) for i in row if int(i) not in SPECIAL_IDS] for row in rows]
    return sp.decode(clean) if clean else []


def _atomic_write(path: Path, data: bytes) -> None:
    # a fresh name opened with "x" follows the umask (mkstemp would make the file private)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
