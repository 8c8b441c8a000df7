"""How closely the transformers and CTranslate2 exports of a checkpoint follow our own decoder.

Usage (from the repository root; needs ``pip install -e '.[export]'``)::

    .venv/bin/python scripts/check_export.py CKPT [--src FILE] [--ref FILE] [--beam 5] [--lenpen A] [--limit N]

Prints one JSON line: for transformers ``generate``, the sentences whose greedy token ids equal ours
and, with ``--beam``, whose beam text equals ours; for CTranslate2 float32, the greedy and beam
outputs equal to ours; BLEU of our greedy output and of CTranslate2 int8 against ``--ref``.
The default data is Multi30k test_2016_flickr.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"

from nmt.checkpoint import load_for_inference  # noqa: E402
from nmt.ct2_engine import CT2Translator  # noqa: E402
from nmt.decoding import greedy_search  # noqa: E402
from nmt.export import build_hf_model, export_ctranslate2  # noqa: E402
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from nmt.translate import translate_lines  # noqa: E402


def read(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def hf_agreement(model, tokenizer, cfg, lines: list[str], beam: int) -> dict:
    """Greedy token ids and beam texts of transformers generate() against ours."""
    hf = build_hf_model(model, tokenizer, cfg)
    d = cfg.decode
    greedy_equal = beam_equal = 0
    ours_beam = list(translate_lines(model, tokenizer, lines, replace(d, beam=beam, nbest=1), search="beam")) if beam > 1 else []
    for start in range(0, len(lines), 64):
        chunk = lines[start:start + 64]
        ids = [[*s, EOS_ID] for s in tokenizer.encode_src(chunk)]
        src = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in ids], batch_first=True,
                                              padding_value=PAD_ID)
        pad = src == PAD_ID
        ours = greedy_search(model, src, pad, d.max_len_a, d.max_len_b, d.min_len, d.no_repeat_ngram)
        limits = [int(d.max_len_a * len(s) + d.max_len_b) for s in ids]
        with torch.inference_mode():
            out = hf.generate(input_ids=src, attention_mask=~pad, num_beams=1, do_sample=False,
                              max_new_tokens=max(limits) + 1, decoder_start_token_id=BOS_ID)
        for row, hyp, limit in zip(out[:, 1:].tolist(), ours, limits, strict=True):
            row = row[: row.index(EOS_ID)] if EOS_ID in row else row
            greedy_equal += row[:limit] == hyp.tokens
        if beam > 1:
            with torch.inference_mode():
                out = hf.generate(input_ids=src, attention_mask=~pad, num_beams=beam, do_sample=False,
                                  max_new_tokens=max(limits) + 1, length_penalty=d.lenpen)
            texts = tokenizer.decode_tgt(out[:, 1:].tolist())
            beam_equal += sum(t == o for t, o in zip(texts, ours_beam[start:start + 64], strict=True))
    return {"hf_greedy_ids_equal": greedy_equal, "hf_beam_text_equal": beam_equal if beam > 1 else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--src", type=Path, default=MULTI30K / "test_2016_flickr.en.gz")
    p.add_argument("--ref", type=Path, default=MULTI30K / "test_2016_flickr.de.gz")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--limit", type=int, default=0, help="first N sentences only (0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lenpen", type=float, default=None,
                   help="beam length penalty for all three decoders (default: the checkpoint's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import sacrebleu

    lines, refs = read(args.src), read(args.ref)
    if args.limit:
        lines, refs = lines[: args.limit], refs[: args.limit]
    model, tokenizer, cfg = load_for_inference(args.checkpoint)
    if args.lenpen is not None:
        cfg = replace(cfg, decode=replace(cfg.decode, lenpen=args.lenpen))
    result = {"sentences": len(lines), **hf_agreement(model, tokenizer, cfg, lines, args.beam)}
    greedy = replace(cfg.decode, beam=1, nbest=1)
    ours = list(translate_lines(model, tokenizer, lines, greedy, search="beam"))
    ours_beam = list(translate_lines(model, tokenizer, lines, replace(cfg.decode, beam=args.beam, nbest=1)))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = CT2Translator(export_ctranslate2(args.checkpoint, Path(tmp) / "fp32"), args.threads)
        int8 = CT2Translator(export_ctranslate2(args.checkpoint, Path(tmp) / "int8", "int8"), args.threads)
        ct2 = list(fp32.translate(lines, greedy))
        ct2_beam = list(fp32.translate(lines, replace(cfg.decode, beam=args.beam)))
        ct2_int8 = list(int8.translate(lines, greedy))
        ct2_int8_beam = list(int8.translate(lines, replace(cfg.decode, beam=args.beam)))
    result.update(
        ct2_fp32_greedy_equal=sum(a == b for a, b in zip(ct2, ours, strict=True)),
        ct2_fp32_beam_text_equal=sum(a == b for a, b in zip(ct2_beam, ours_beam, strict=True)),
        bleu_ours_greedy=round(sacrebleu.corpus_bleu(ours, [refs]).score, 2),
        bleu_ct2_fp32_greedy=round(sacrebleu.corpus_bleu(ct2, [refs]).score, 2),
        bleu_ct2_int8_greedy=round(sacrebleu.corpus_bleu(ct2_int8, [refs]).score, 2),
        bleu_ours_beam=round(sacrebleu.corpus_bleu(ours_beam, [refs]).score, 2),
        bleu_ct2_fp32_beam=round(sacrebleu.corpus_bleu(ct2_beam, [refs]).score, 2),
        bleu_ct2_int8_beam=round(sacrebleu.corpus_bleu(ct2_int8_beam, [refs]).score, 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
