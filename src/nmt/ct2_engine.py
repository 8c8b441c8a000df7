"""Translation with a CTranslate2 export (``nmt export --to ctranslate2``), under our decode settings.

Source pieces come from the export's SentencePiece model with EOS appended, as our decoder sees them.
Our per-sentence length limit int(a * src_len + b) is applied by asking CTranslate2 for one token
more than the batch's longest limit and cutting each output at its own limit: greedy search is
prefix-deterministic, so that equals forcing EOS there. CTranslate2's beam search normalises scores
by length ** lenpen, not by the GNMT penalty our beam search uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path

from nmt.config import DecodeConfig
from nmt.errors import NMTError
from nmt.export import DECODE_FILE, require

_SUPPRESSED = [["<pad>"], ["<s>"]]  # never generated, as in our search


def is_ct2_dir(path: str | Path) -> bool:
    return (Path(path) / "model.bin").is_file()


class CT2Translator:
    """A loaded CTranslate2 export: ``translate(lines, decode)`` -> texts."""

    def __init__(self, directory: str | Path, threads: int = 0, compute_type: str = "default") -> None:
        ct2 = require("ctranslate2")
        import sentencepiece as spm

        directory = Path(directory)
        if not is_ct2_dir(directory) or not (directory / "source.spm").is_file():
            raise NMTError(f"{directory} is not an nmt CTranslate2 export (no model.bin / source.spm)")
        self.translator = ct2.Translator(str(directory), device="cpu", intra_threads=threads,
                                         compute_type=compute_type)
        self.sp = spm.SentencePieceProcessor(model_file=str(directory / "source.spm"))
        info = json.loads((directory / DECODE_FILE).read_text(encoding="utf-8"))
        known = {f.name for f in fields(DecodeConfig)}
        self.decode = DecodeConfig(**{k: v for k, v in info["decode"].items() if k in known})
        self.src_lang, self.tgt_lang = info["src_lang"], info["tgt_lang"]
        self.max_positions = int(info["max_positions"])

    def translate(self, lines: Iterable[str], decode: DecodeConfig | None = None,
                  chunk_lines: int = 10_000) -> Iterator[str]:
        """Translations of ``lines`` in order (empty lines give empty outputs)."""
        decode = decode or self.decode
        chunk: list[str] = []
        for line in lines:
            chunk.append(line.rstrip("\r\n"))
            if len(chunk) >= chunk_lines:
                yield from self._chunk(chunk, decode)
                chunk = []
        if chunk:
            yield from self._chunk(chunk, decode)

    def _chunk(self, texts: list[str], d: DecodeConfig) -> list[str]:
        todo = [i for i, t in enumerate(texts) if t.strip()]
        out = [""] * len(texts)
        if not todo:
            return out
        pieces = [p[: self.max_positions - 1] + ["</s>"]
                  for p in self.sp.encode([texts[i] for i in todo], out_type=str)]
        limits = [min(int(d.max_len_a * len(p) + d.max_len_b), self.max_positions - 1) for p in pieces]
        results = self.translator.translate_batch(
            pieces, beam_size=d.beam, length_penalty=d.lenpen, max_decoding_length=max(limits) + 1,
            min_decoding_length=d.min_len, suppress_sequences=_SUPPRESSED,
            no_repeat_ngram_size=d.no_repeat_ngram, max_batch_size=d.batch_tokens,
            batch_type="tokens", return_scores=False)
        for i, limit, result in zip(todo, limits, results, strict=True):
            out[i] = self.sp.decode_pieces(result.hypotheses[0][:limit])
        return out
