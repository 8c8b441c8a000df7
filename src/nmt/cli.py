"""The ``nmt`` command line: train, translate, evaluate, average, prepare, plot, attention, export,
serve, generate, fill-mask."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from nmt import __version__
from nmt.errors import NMTError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENGINES = ("nmt", "ctranslate2")


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, metavar="FILE",
                   help="YAML config; its values override the built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.lr=5e-4 model.dropout=0.3 data.dir=null")


def _decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--beam", type=int, metavar="N", help="beam size (default: the checkpoint's decode.beam, 5)")
    mode.add_argument("--greedy", action="store_true", help="greedy search (same as --beam 1)")
    mode.add_argument("--sample", action="store_true", help="sample from the model instead of searching")
    g.add_argument("--lenpen", type=float, help="GNMT length penalty alpha (beam search)")
    g.add_argument("--max-len-a", type=float, help="max output length = a * source length + b")
    g.add_argument("--max-len-b", type=int, help="see --max-len-a")
    g.add_argument("--min-len", type=int, help="minimum output length in tokens")
    g.add_argument("--nbest", type=int, help="hypotheses printed per sentence (beam search)")
    g.add_argument("--no-repeat-ngram", type=int, metavar="N", help="forbid repeating any N-gram")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (--sample)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most probable tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass (1.0 = off)")
    g.add_argument("--seed", type=int, default=1, help="random seed for --sample")
    r = p.add_argument_group("runtime")
    r.add_argument("--batch-tokens", type=int, help="source tokens per batch (default: decode.batch_tokens)")
    r.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: CUDA if available)")
    r.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast precision (auto: bf16 on a GPU that has it, else fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmt", description="Train and use Transformer translation models.")
    parser.add_argument("--version", action="version", version=f"nmt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (resumes when run_dir has checkpoints/last.pt)",
                       description="Train a model; rerunning on an existing run_dir resumes from last.pt.")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="tokenize and cache a corpus, print statistics",
                       description="Train SentencePiece, clean and binarize the corpus into the shared data cache (data.cache_dir).")
    _config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("translate", help="translate text with a checkpoint",
                       description="Translate one sentence per line; output order follows the input.")
    p.add_argument("-m", "--model", required=True, metavar="CKPT", help="checkpoint file (.pt)")
    p.add_argument("-i", "--input", metavar="FILE", help="input text (default: stdin)")
    p.add_argument("-o", "--output", metavar="FILE", help="output text (default: stdout)")
    p.add_argument("--scores", action="store_true", help="prefix each line with its model score and a tab")
    p.add_argument("--engine", choices=ENGINES, default="nmt",
                   help="nmt: our decoder on a checkpoint; ctranslate2: an `nmt export --to "
                        "ctranslate2` folder as -m (greedy/beam only; pip install 'nmt[export]')")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of --engine ctranslate2 (0 = all)")
    _decode_args(p)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("evaluate", help="translate a test set and score it with sacreBLEU",
                       description="Score BLEU/chrF/TER of a checkpoint on --src/--ref files, or on the "
                                   "test split of a config (-c).")
    p.add_argument("-m", "--model", metavar="CKPT",
                   help="checkpoint (default with -c: run_dir/checkpoints/best.pt, else last.pt)")
    p.add_argument("--src", metavar="FILE", help="source sentences")
    p.add_argument("--ref", metavar="FILE", help="reference translations")
    p.add_argument("--out", metavar="HYP", help="also write the translations here")
    p.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU")
    _config_args(p, required=False)
    _decode_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("average", help="average the weights of several checkpoints",
                       description="Average model weights (e.g. the last K step checkpoints).")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="averaged checkpoint to write")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoints to average")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--last", nargs=2, metavar=("K", "RUN_DIR"),
                       help="average the newest K step checkpoints of RUN_DIR/checkpoints")
    which.add_argument("--best", nargs=2, metavar=("K", "RUN_DIR"),
                       help="average the step checkpoints of the K best validations of RUN_DIR "
                            "(by its train.best_metric; see train.keep_best)")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("plot", help="plot a run's training curves, or the positional encoding",
                       description="Draw training and validation loss, validation BLEU, learning rate "
                                   "and tokens/s against step from RUN_DIR/metrics.jsonl; or, with "
                                   "--positional, the sinusoidal positional-encoding matrix. Needs "
                                   "matplotlib (pip install 'nmt[plot]').")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run_dir of an nmt train run")
    p.add_argument("-o", "--output", metavar="FILE.png",
                   help="picture to write (default: RUN_DIR/curves.png, or positional_encoding.png)")
    g = p.add_argument_group("positional encoding")
    g.add_argument("--positional", action="store_true",
                   help="plot the model's sinusoidal positional encoding instead of a run")
    g.add_argument("--d-model", type=int, default=512, metavar="D", help="embedding width (default: 512)")
    g.add_argument("--length", type=int, default=100, metavar="N", help="number of positions (default: 100)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("attention", help="draw attention heatmaps of one sentence",
                       description="Write PNG heatmaps of encoder self-attention, decoder "
                                   "self-attention and cross-attention for one sentence: per layer a "
                                   "grid of every head and their mean, and per kind the head mean of "
                                   "every layer. Without --tgt the target is the model's greedy "
                                   "translation. Needs matplotlib (pip install 'nmt[plot]').")
    p.add_argument("-m", "--model", required=True, metavar="CKPT", help="checkpoint file (.pt)")
    p.add_argument("--src", required=True, metavar="SENTENCE", help="source sentence (plain text)")
    p.add_argument("--tgt", metavar="SENTENCE",
                   help="reference translation to teacher-force (default: the greedy translation)")
    p.add_argument("-o", "--output", default="attention", metavar="DIR",
                   help="folder for the PNG files (default: ./attention)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where to run (default: cpu)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("fill-mask", help="the likeliest words for each <mask> (a task mlm checkpoint)",
                       description="Print, for each <mask> of TEXT, the most likely fillers of a masked-LM "
                                   "(task mlm) checkpoint with their probabilities.")
    p.add_argument("-m", "--model", required=True, metavar="CKPT", help="checkpoint trained with task=mlm")
    p.add_argument("text", metavar="TEXT", help='a sentence with one or more <mask>, e.g. "A man <mask> a bike."')
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="fillers printed per <mask> (default: 5)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: CUDA if available)")
    p.set_defaults(func=cmd_fill_mask)
    _export_parser(sub)
    _serve_parser(sub)
    _generate_parser(sub)
    return parser


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a language model (task lm)",
                       description="Sample continuations of a prompt from a language-model checkpoint "
                                   "(task: lm); one sample per line, the prompt included.")
    p.add_argument("-m", "--model", required=True, metavar="CKPT", help="checkpoint file (.pt) of task lm")
    p.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: none, from scratch)")
    p.add_argument("--num", type=int, default=1, metavar="N", help="samples to print (default: 1)")
    p.add_argument("--max-len", type=int, default=64, metavar="L", help="most pieces added to the prompt (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most probable tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=1, help="random seed: the same seed gives the same samples")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: CUDA if available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast precision (auto: bf16 on a GPU that has it, else fp32)")
    p.set_defaults(func=cmd_generate)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to transformers or CTranslate2",
                       description="Write a Hugging Face transformers model folder (MarianMTModel for "
                                   "post-norm, PegasusForConditionalGeneration for pre-norm models, "
                                   "with the SentencePiece tokenizer) or a CTranslate2 model folder. "
                                   "Needs pip install 'nmt[export]'.")
    p.add_argument("--to", required=True, choices=("transformers", "ctranslate2"), help="target format")
    p.add_argument("-m", "--model", required=True, metavar="CKPT", help="checkpoint file (.pt)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder to write: new or empty (written beside it, then renamed into place)")
    p.add_argument("--force", action="store_true",
                   help="replace DIR if it holds a previous export (never any other folder)")
    p.add_argument("--quantization", default="float32", choices=("float32", "int8", "int8_float32"),
                   help="CTranslate2 weight type (default: float32)")
    p.set_defaults(func=cmd_export)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (LibreTranslate API and a web page)",
                       description="Serve POST /translate and GET /languages as LibreTranslate does, "
                                   "GET /health, and a web page at / showing translations with their "
                                   "cross-attention. Needs pip install 'nmt[serve]'.")
    p.add_argument("-m", "--model", required=True, metavar="CKPT_OR_EXPORT",
                   help="checkpoint (.pt) or an `nmt export --to ctranslate2` folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1); another one without --api-keys "
                        "is named in a warning")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, metavar="MS",
                   help="how long the first request of a batch waits for others (default: 5)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="most requests decoded together; 1 = one request at a time (default: 64)")
    p.add_argument("--queue-size", type=int, default=256, metavar="N",
                   help="requests waiting beyond this are answered 503 (default: 256)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for decoding (0 = torch's default)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds a request may wait and decode before it is answered 504; requests "
                        "past it are not decoded (0 = no limit; default: 60)")
    p.add_argument("--max-chars", type=int, default=2000, metavar="N",
                   help="longest text in characters; longer is answered 413 (default: 2000)")
    p.add_argument("--max-texts", type=int, default=128, metavar="N",
                   help="most texts in one request's q list (default: 128)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024, metavar="N",
                   help="largest request body (default: 65536)")
    p.add_argument("--max-batch-tokens", type=int, default=4096, metavar="N",
                   help="most source tokens decoded together; a request over it is answered 413 "
                        "(default: 4096)")
    p.add_argument("--api-keys", metavar="FILE",
                   help="require LibreTranslate's api_key parameter to be one of FILE's keys (one a "
                        "line); without it 403 (default: no keys)")
    p.set_defaults(func=cmd_serve)


def cmd_train(args: argparse.Namespace) -> int:
    from nmt.config import load_config

    cfg = load_config(args.config, args.overrides)
    from nmt.train import train  # heavy imports only once the config is known to be good

    train(cfg)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from nmt.config import load_config
    from nmt.data.prepare import prepare_data

    prepare_data(load_config(args.config, args.overrides))
    return 0


def _decode_settings(args: argparse.Namespace, base):
    """DecodeConfig from the checkpoint's decode section with the command-line flags on top."""
    from dataclasses import replace

    from nmt.config import validate_decode

    changes = {k: getattr(args, k) for k in ("beam", "lenpen", "max_len_a", "max_len_b", "min_len", "nbest",
                                              "no_repeat_ngram", "batch_tokens") if getattr(args, k) is not None}
    if args.greedy:
        changes["beam"] = 1
    decode = replace(base, **changes)
    validate_decode(decode)
    search = "sample" if args.sample else ("greedy" if decode.beam == 1 else "beam")
    return decode, search


def _load(args: argparse.Namespace, path: str | Path):
    from nmt.checkpoint import load_for_inference
    from nmt.runtime import resolve_device

    device = resolve_device(args.device)
    model, tokenizer, cfg = load_for_inference(path, device)
    decode, search = _decode_settings(args, cfg.decode)
    return model, tokenizer, cfg, decode, search, device


def _translate(args, model, tokenizer, decode, search, device, lines, chunk_lines: int = 10_000):
    from nmt.precision import decode_precision
    from nmt.runtime import configure_math
    from nmt.translate import translate_lines

    precision = decode_precision(args.precision, device)
    configure_math(device, precision)  # fp32 on a GPU: TF32 matmuls
    return translate_lines(model, tokenizer, lines, decode, device, precision, search=search,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, with_scores=getattr(args, "scores", False),
                           chunk_lines=chunk_lines)


def cmd_translate(args: argparse.Namespace) -> int:
    if args.engine == "ctranslate2":
        return _translate_ct2(args)
    model, tokenizer, _, decode, search, device = _load(args, args.model)
    interactive = not args.input and sys.stdin.isatty()
    with contextlib.ExitStack() as stack:
        if args.input:
            src = stack.enter_context(_open_input(args.input, binary=True))
        else:
            src = getattr(sys.stdin, "buffer", sys.stdin)
        out = stack.enter_context(_open_output(args.output)) if args.output else sys.stdout
        lines = _prompted_lines() if interactive else _utf8_lines(src, args.input or "stdin")
        # At a prompt each line is translated at once; otherwise lines are batched for speed.
        results = _translate(args, model, tokenizer, decode, search, device, lines,
                             chunk_lines=1 if interactive else 10_000)
        show_bar = not interactive and sys.stderr.isatty()
        for text in tqdm(results, unit="line", disable=not show_bar, leave=False):
            out.write(text + "\n")
            if out is sys.stdout:
                out.flush()
    return 0


def _translate_ct2(args: argparse.Namespace) -> int:
    from nmt.ct2_engine import CT2Translator

    if args.sample or args.scores or (args.nbest or 1) > 1 or args.precision not in ("auto", "fp32") or args.device == "cuda":
        raise NMTError("--engine ctranslate2 supports greedy and beam search with one output per line, "
                       "on the CPU (no --sample, --scores, --nbest, --precision, --device cuda)")
    translator = CT2Translator(args.model, threads=args.threads)
    decode, _ = _decode_settings(args, translator.decode)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(_open_input(args.input, binary=True)) if args.input else sys.stdin.buffer
        out = stack.enter_context(_open_output(args.output)) if args.output else sys.stdout
        for text in translator.translate(_utf8_lines(src, args.input or "stdin"), decode):
            out.write(text + "\n")
    return 0


def _prompted_lines():
    """Sentences typed at a terminal, each after a ``> `` prompt on stderr, until Ctrl-D."""
    print("Type a sentence and press Enter; Ctrl-D quits.", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            print(file=sys.stderr)
            return
        yield line.rstrip("\r\n")


def _open_input(path: str, binary: bool = False):
    if not Path(path).is_file():
        raise NMTError(f"input file not found: {path}")
    return open(path, "rb") if binary else open(path, encoding="utf-8", errors="strict")


def _open_output(path: str):
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise NMTError(f"cannot write {path}: {e.strerror or e}") from None


def _utf8_lines(f, name: str):
    """Lines of a binary stream as text without line endings (``\\r\\n`` too) or a leading BOM;
    bytes that are not UTF-8 stop with a one-line NMTError naming the line."""
    for number, raw in enumerate(f, 1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NMTError(f"{name} line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
        line = raw.rstrip("\r\n")
        yield line.removeprefix("\ufeff") if number == 1 else line


def _read_lines(path: str) -> list[str]:
    try:
        with _open_input(path) as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise NMTError(f"{path} is not valid UTF-8 (byte offset {e.start})") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nmt.evaluate import format_scores, score

    src, refs, model_path, tgt_lang = _evaluation_inputs(args)
    model, tokenizer, cfg, decode, search, device = _load(args, model_path)
    hyps = list(_translate(args, model, tokenizer, decode, search, device, src))
    if args.out:
        Path(args.out).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    result = score(hyps, refs, tgt_lang or cfg.data.tgt_lang, lowercase=args.lowercase)
    print(json.dumps(result))
    print(format_scores(result), file=sys.stderr)
    return 0


def _evaluation_inputs(args: argparse.Namespace):
    """(source lines, reference lines, checkpoint path, target language or None)."""
    if args.config:
        from nmt.checkpoint import check_task
        from nmt.config import load_config
        from nmt.data.corpus import read_split

        cfg = load_config(args.config, args.overrides)
        check_task(cfg, args.config)
        src, refs = read_split(cfg.data, "test")
        ckpts = Path(cfg.run_dir) / "checkpoints"
        model = args.model or str(ckpts / "best.pt" if (ckpts / "best.pt").is_file() else ckpts / "last.pt")
        return src, refs, model, cfg.data.tgt_lang
    if not (args.model and args.src and args.ref):
        raise NMTError("evaluate needs -m CKPT --src FILE --ref FILE, or -c CONFIG")
    src, refs = _read_lines(args.src), _read_lines(args.ref)
    if len(src) != len(refs):
        raise NMTError(f"{args.src} has {len(src)} lines but {args.ref} has {len(refs)}")
    return src, refs, args.model, None


def best_validated(run_dir: str, checkpoints: list[Path], k: int) -> list[Path]:
    """The checkpoints among ``checkpoints`` of the ``k`` best validations in ``run_dir/metrics.jsonl``,
    ranked by the run's ``train.best_metric`` (ties: the earlier step); oldest step first."""
    from nmt.checkpoint import checkpoint_step
    from nmt.config import load_config
    from nmt.plot import read_metrics
    from nmt.validate import best_metric

    metric = best_metric(load_config(Path(run_dir) / "config.yaml"))
    by_step = {checkpoint_step(p): p for p in checkpoints}
    scored = [(r["valid_bleu"] if metric == "bleu" else -r["valid_loss"], r["step"])
              for r in read_metrics(run_dir)[1] if r["step"] in by_step]
    if not scored:
        raise NMTError(f"none of the step checkpoints of {run_dir} has a validation in its metrics.jsonl")
    best = sorted(scored, key=lambda t: (-t[0], t[1]))[:k]
    return [by_step[step] for step in sorted(step for _, step in best)]


def cmd_average(args: argparse.Namespace) -> int:
    from nmt.checkpoint import average_checkpoints, save_checkpoint, step_checkpoints

    paths = list(args.checkpoints)
    for flag, chosen in (("--last", args.last), ("--best", args.best)):
        if chosen:
            k, run_dir = chosen
            if not k.isdigit() or int(k) < 1:
                raise NMTError(f"{flag} needs a positive number, got {k!r}")
            found = step_checkpoints(Path(run_dir) / "checkpoints")
            if not found:
                raise NMTError(f"no checkpoint_<step>.pt files in {Path(run_dir) / 'checkpoints'}")
            paths += found[-int(k):] if flag == "--last" else best_validated(run_dir, found, int(k))
    save_checkpoint(average_checkpoints(paths), args.output)
    print(f"averaged {len(paths)} checkpoints into {args.output}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from nmt.plot import plot_positional, plot_training

    if args.positional:
        if args.run_dir:
            raise NMTError("give either RUN_DIR or --positional, not both")
        out = plot_positional(args.d_model, args.length, args.output or "positional_encoding.png")
    elif args.run_dir:
        out = plot_training(args.run_dir, args.output or Path(args.run_dir) / "curves.png")
    else:
        raise NMTError("plot needs RUN_DIR (training curves) or --positional")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from nmt.attention_maps import sentence_attention
    from nmt.attention_plot import plot_attention
    from nmt.checkpoint import load_for_inference
    from nmt.plot import new_figure
    from nmt.runtime import resolve_device

    new_figure(1, 1)  # a missing matplotlib fails before the model is loaded
    device = resolve_device(args.device)
    model, tokenizer, cfg = load_for_inference(args.model, device)
    att = sentence_attention(model, tokenizer, args.src, args.tgt, cfg.decode, device)
    paths = plot_attention(att, args.output)
    print(f"target: {att.target}", file=sys.stderr)
    print(f"wrote {len(paths)} pictures to {args.output}", file=sys.stderr)
    return 0


def cmd_fill_mask(args: argparse.Namespace) -> int:
    from nmt.checkpoint import load_for_inference
    from nmt.mlm import fill_mask
    from nmt.runtime import resolve_device

    if args.top_k < 1:
        raise NMTError(f"--top-k must be >= 1, got {args.top_k}")
    model, tokenizer, _ = load_for_inference(args.model, resolve_device(args.device), task="mlm")
    for number, fillers in enumerate(fill_mask(model, tokenizer, args.text, args.top_k), 1):
        print(f"<mask> {number}: " + " | ".join(f"{word} {prob:.3f}" for word, prob in fillers))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nmt.export import export_ctranslate2, export_transformers

    if args.to == "transformers":
        if args.quantization != "float32":
            raise NMTError("--quantization applies to --to ctranslate2 only")
        out = export_transformers(args.model, args.output, force=args.force)
    else:
        out = export_ctranslate2(args.model, args.output, args.quantization, force=args.force)
    print(f"wrote {args.to} model to {out}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from nmt.serve import ServeOptions, load_api_keys, serve

    keys = load_api_keys(args.api_keys) if args.api_keys else None
    serve(args.model, ServeOptions(host=args.host, port=args.port, batch_window_ms=args.batch_window_ms,
                                   max_batch=args.max_batch, queue_size=args.queue_size,
                                   threads=args.threads, timeout=args.timeout, max_chars=args.max_chars,
                                   max_texts=args.max_texts, max_body_bytes=args.max_body_bytes,
                                   max_batch_tokens=args.max_batch_tokens, api_keys=keys))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from nmt.checkpoint import load_for_inference
    from nmt.generate import generate
    from nmt.precision import decode_precision
    from nmt.runtime import configure_math, resolve_device
    from nmt.translate import SamplingOptions

    device = resolve_device(args.device)
    model, tokenizer, cfg = load_for_inference(args.model, device, task="lm")
    precision = decode_precision(args.precision, device)
    configure_math(device, precision)
    sampling = SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed)
    for text in generate(model, tokenizer, args.prompt, args.num, args.max_len, cfg.model.max_positions,
                         sampling, device, precision):
        print(text)
    return 0


def _warm_cpu_allocator() -> None:
    import torch

    from nmt import runtime

    if not torch.cuda.is_available():  # the CPU does the work: keep its allocator warm
        runtime.keep_freed_memory()


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is not cmd_prepare:  # prepare computes nothing in torch: its memory should go back
        _warm_cpu_allocator()
    try:
        return args.func(args)
    except NMTError as e:
        if os.environ.get("NMT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
