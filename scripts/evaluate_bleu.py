#!/usr/bin/env python
"""sacreBLEU BLEU and chrF of a detokenized hypothesis file against one or more reference files.

Prints one JSON object (scores and signatures) on stdout and a readable line on stderr.
Usage: evaluate_bleu.py HYP REF [REF ...] [--lowercase] [--tokenize TOK] [--tgt-lang LANG]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import nmt  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sacrebleu.metrics import BLEU

from nmt.errors import NMTError
from nmt.evaluate import format_scores, score_streams


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file split on "\\n" only (as ``wc -l`` counts them), newlines removed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NMTError(f"cannot read {path}: {e}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hyp", help="hypothesis file, one detokenized sentence per line")
    parser.add_argument("refs", nargs="+", help="reference file(s), same number of lines")
    parser.add_argument("--lowercase", "-lc", action="store_true", help="case-insensitive scores")
    parser.add_argument("--tokenize", "-tok", choices=list(BLEU.TOKENIZERS), default=None,
                        help="BLEU tokenizer (default: chosen from --tgt-lang, else 13a)")
    parser.add_argument("--tgt-lang", "-l", default="", help="target language code, e.g. de or zh")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        hyps = read_lines(args.hyp)
        refs = [read_lines(path) for path in args.refs]
        for path, lines in zip(args.refs, refs, strict=True):
            if len(lines) != len(hyps):
                raise NMTError(f"{args.hyp} has {len(hyps)} lines but {path} has {len(lines)}")
        result = score_streams(hyps, refs, tgt_lang=args.tgt_lang, lowercase=args.lowercase,
                               tokenize=args.tokenize, metrics=("bleu", "chrf"))
    except NMTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    print(format_scores(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
