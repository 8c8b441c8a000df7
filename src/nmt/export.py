"""Export a checkpoint to Hugging Face ``transformers`` and to CTranslate2.

Our post-norm model has the layer layout of ``MarianMTModel`` and our pre-norm one (with a final
LayerNorm per stack) that of ``PegasusForConditionalGeneration``: both scale embeddings by
sqrt(d_model) and add a fixed sinusoidal table from position 0. The only difference is the table's
layout: ours interleaves sin/cos (dims 2i, 2i+1), theirs puts every sine first ([sin | cos]), with
the same frequencies. Permuting the model dimension (dims 0, 2, 4, .. then 1, 3, 5, ..) on every
weight that reads or writes the residual stream gives the same function: LayerNorm is
permutation-equivariant and attention/feed-forward inner dims are untouched. The SentencePiece model
goes into the export as a ``MarianTokenizer`` (its vocab.json is the piece -> id table, so ids are ours).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import torch

from nmt.errors import NMTError
from nmt.special import BOS_ID, EOS_ID, PAD_ID

DECODE_FILE = "nmt_decode.json"  # our decode settings, for `nmt serve` / `translate --engine`
QUANTIZATIONS = ("float32", "int8", "int8_float32")
MODEL_FILES = ("config.json", "model.bin")  # a transformers / CTranslate2 model; with DECODE_FILE, an export


def require(module: str, extra: str = "export"):
    """Import ``module``, or fail with one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise NMTError(f"{module} is not installed; pip install 'nmt[{extra}]'") from None


def residual_permutation(d_model: int) -> torch.Tensor:
    """Index [D]: dimension i of the exported model is dimension perm[i] of ours."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def hf_config(cfg, vocab_size: int):
    """A MarianConfig (post-norm) or PegasusConfig (pre-norm) with our sizes and special ids."""
    transformers = require("transformers")
    m = cfg.model
    common = dict(
        vocab_size=vocab_size, d_model=m.d_model, encoder_layers=m.encoder_layers,
        decoder_layers=m.decoder_layers, encoder_attention_heads=m.heads,
        decoder_attention_heads=m.heads, encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff,
        activation_function=m.activation, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=m.max_positions, scale_embedding=True, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None, tie_word_embeddings=True, is_encoder_decoder=True,
    )
    if m.norm_first:
        return transformers.PegasusConfig(**common)
    return transformers.MarianConfig(**common, share_encoder_decoder_embeddings=True,
                                     static_position_embeddings=True, normalize_embedding=False,
                                     decoder_vocab_size=vocab_size)


def hf_state_dict(model, cfg) -> dict[str, torch.Tensor]:
    """Our weights under the exported model's names, residual dimension permuted."""
    from nmt.model.embeddings import sinusoidal_table

    m = cfg.model
    perm = residual_permutation(m.d_model)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def cols(w):  # a weight reading the residual stream: [out, D]
        return w[:, perm]

    def rows(w):  # a weight or bias writing it: [D, ...]
        return w[perm]

    def norm(ours: str, theirs: str) -> None:
        out[f"{theirs}.weight"], out[f"{theirs}.bias"] = rows(sd[f"{ours}.weight"]), rows(sd[f"{ours}.bias"])

    def attention(ours: str, theirs: str, fused: str, names: tuple[str, ...]) -> None:
        w, b = sd[f"{ours}.{fused}.weight"], sd[f"{ours}.{fused}.bias"]
        for name, wi, bi in zip(names, w.chunk(len(names)), b.chunk(len(names)), strict=True):
            out[f"{theirs}.{name}.weight"], out[f"{theirs}.{name}.bias"] = cols(wi), bi
        out[f"{theirs}.out_proj.weight"] = rows(sd[f"{ours}.out_proj.weight"])
        out[f"{theirs}.out_proj.bias"] = rows(sd[f"{ours}.out_proj.bias"])

    def feed_forward(ours: str, theirs: str) -> None:
        out[f"{theirs}.fc1.weight"], out[f"{theirs}.fc1.bias"] = cols(sd[f"{ours}.linear1.weight"]), sd[f"{ours}.linear1.bias"]
        out[f"{theirs}.fc2.weight"], out[f"{theirs}.fc2.bias"] = rows(sd[f"{ours}.linear2.weight"]), rows(sd[f"{ours}.linear2.bias"])

    embedding = cols(sd["encoder.embed.token.weight"])
    table = sinusoidal_table(m.max_positions, m.d_model)[:, perm]
    out["model.shared.weight"] = embedding
    for stack in ("encoder", "decoder"):
        out[f"model.{stack}.embed_tokens.weight"] = embedding
        out[f"model.{stack}.embed_positions.weight"] = table
        if m.norm_first:
            norm(f"{stack}.final_norm", f"model.{stack}.layer_norm")
    out["lm_head.weight"] = embedding
    out["final_logits_bias"] = torch.zeros(1, embedding.size(0))
    for i in range(m.encoder_layers):
        ours, theirs = f"encoder.layers.{i}", f"model.encoder.layers.{i}"
        attention(f"{ours}.self_attn", f"{theirs}.self_attn", "qkv", ("q_proj", "k_proj", "v_proj"))
        norm(f"{ours}.norm1", f"{theirs}.self_attn_layer_norm")
        feed_forward(f"{ours}.ff", theirs)
        norm(f"{ours}.norm2", f"{theirs}.final_layer_norm")
    for i in range(m.decoder_layers):
        ours, theirs = f"decoder.layers.{i}", f"model.decoder.layers.{i}"
        attention(f"{ours}.self_attn", f"{theirs}.self_attn", "qkv", ("q_proj", "k_proj", "v_proj"))
        norm(f"{ours}.norm1", f"{theirs}.self_attn_layer_norm")
        out[f"{theirs}.encoder_attn.q_proj.weight"] = cols(sd[f"{ours}.cross_attn.q_proj.weight"])
        out[f"{theirs}.encoder_attn.q_proj.bias"] = sd[f"{ours}.cross_attn.q_proj.bias"]
        kv_w, kv_b = sd[f"{ours}.cross_attn.kv_proj.weight"], sd[f"{ours}.cross_attn.kv_proj.bias"]
        for name, wi, bi in zip(("k_proj", "v_proj"), kv_w.chunk(2), kv_b.chunk(2), strict=True):
            out[f"{theirs}.encoder_attn.{name}.weight"], out[f"{theirs}.encoder_attn.{name}.bias"] = cols(wi), bi
        out[f"{theirs}.encoder_attn.out_proj.weight"] = rows(sd[f"{ours}.cross_attn.out_proj.weight"])
        out[f"{theirs}.encoder_attn.out_proj.bias"] = rows(sd[f"{ours}.cross_attn.out_proj.bias"])
        norm(f"{ours}.norm2", f"{theirs}.encoder_attn_layer_norm")
        feed_forward(f"{ours}.ff", theirs)
        norm(f"{ours}.norm3", f"{theirs}.final_layer_norm")
    return out


def check_architecture(cfg) -> None:
    """The exported layouts are encoder-decoder models: refuse any other before any work."""
    if cfg.model.arch != "encoder_decoder":
        raise NMTError(f"export supports model.arch=encoder_decoder only; this checkpoint is "
                       f"model.arch={cfg.model.arch}")


def _check_exportable(cfg, tokenizer) -> None:
    check_architecture(cfg)
    if not cfg.model.tie_embeddings or not tokenizer.joint:
        raise NMTError("export needs a model with model.tie_embeddings=true and a joint tokenizer "
                       "(tokenizer.joint=true): the exported layouts share one embedding table")
    if cfg.model.d_model % 2:
        raise NMTError(f"export needs an even model.d_model, got {cfg.model.d_model}")


def build_hf_model(model, tokenizer, cfg):
    """The transformers model (eval mode) computing the same function as ``model``."""
    transformers = require("transformers")
    _check_exportable(cfg, tokenizer)
    config = hf_config(cfg, tokenizer.tgt_vocab_size)
    cls = (transformers.PegasusForConditionalGeneration if cfg.model.norm_first
           else transformers.MarianMTModel)
    hf = cls(config).eval()
    weights = hf_state_dict(model, cfg)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    # the tied copies (encoder/decoder embed_tokens, lm_head) may be absent from the state dict
    if unexpected or any(k not in weights for k in missing):
        raise NMTError(f"internal: export mapping is off (missing {missing[:3]}, unexpected {unexpected[:3]})")
    _generation_defaults(hf.generation_config, cfg)
    return hf


def _generation_defaults(gen, cfg) -> None:
    """generate() defaults that follow our search: start from BOS, never emit PAD/BOS."""
    d = cfg.decode
    gen.decoder_start_token_id, gen.bos_token_id = BOS_ID, BOS_ID
    gen.eos_token_id, gen.pad_token_id = EOS_ID, PAD_ID
    gen.forced_eos_token_id = None
    gen.suppress_tokens = [PAD_ID, BOS_ID]
    gen.min_new_tokens = d.min_len or None
    gen.num_beams = d.beam
    if d.beam > 1:  # transformers refuses to save beam settings without a beam
        gen.length_penalty = d.lenpen  # their normalisation is length ** lenpen, ours GNMT's
        gen.early_stopping = True  # a sentence ends once it has num_beams finished hypotheses, as ours does
    gen.max_length = cfg.model.max_positions


def _write_tokenizer(tokenizer, cfg, out: Path) -> None:
    transformers = require("transformers")
    import sentencepiece as spm

    proto = tokenizer.to_state()["joint"]
    sp = spm.SentencePieceProcessor(model_proto=proto)
    for name in ("source.spm", "target.spm"):
        (out / name).write_bytes(proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    hf_tok = transformers.MarianTokenizer(
        str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"),
        source_lang=cfg.data.src_lang, target_lang=cfg.data.tgt_lang,
        model_max_length=cfg.model.max_positions)
    hf_tok.save_pretrained(out)


def _write_transformers(checkpoint: str | Path, out: Path) -> Path:
    from dataclasses import asdict

    from nmt.checkpoint import load_for_inference

    model, tokenizer, cfg = load_for_inference(checkpoint)
    check_architecture(cfg)
    hf = build_hf_model(model, tokenizer, cfg)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    _write_tokenizer(tokenizer, cfg, out)
    info = {"decode": asdict(cfg.decode), "src_lang": cfg.data.src_lang, "tgt_lang": cfg.data.tgt_lang,
            "max_positions": cfg.model.max_positions}
    (out / DECODE_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out


def is_export(path: Path) -> bool:
    """Whether ``path`` is a folder an earlier `nmt export` wrote (its marker files)."""
    return (path / DECODE_FILE).is_file() and any((path / name).is_file() for name in MODEL_FILES)


def _check_target(out: Path, force: bool) -> None:
    """Refuse to write over anything but an empty folder, or with ``force`` a previous export."""
    if out.exists() and not out.is_dir():
        raise NMTError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise NMTError(f"{out} exists and is not empty; give an empty or new folder, or --force to "
                       f"replace a previous export there")
    if not is_export(out):
        raise NMTError(f"{out} is not a previous nmt export (no {DECODE_FILE} with config.json or "
                       f"model.bin); --force replaces only those")


def _publish(out_dir: str | Path, force: bool, write: Callable[[Path, Path], None]) -> Path:
    """Run ``write(target, scratch)`` into a fresh folder beside ``out_dir``, then rename it into place.

    ``target`` does not exist yet; ``scratch`` is an empty folder for intermediate files. Nothing at
    ``out_dir`` is touched until the export is complete, and a failed export leaves it as it was.
    """
    out = Path(os.path.abspath(out_dir))
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (stage / "scratch").mkdir()
        write(stage / "export", stage / "scratch")
        new = stage / "export"
        umask = os.umask(0)
        os.umask(umask)
        new.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared export from its group
        _check_target(out, force)  # again: the export took a while
        if out.is_dir():
            with suppress(OSError):
                out.rmdir()  # empty: the rename below may take its place
        if out.exists():  # a previous export: swap it out, then remove it
            old = stage / "previous"
            out.rename(old)
        new.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def export_transformers(checkpoint: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write a directory that ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer`` / ``pipeline`` load.

    ``out_dir`` must be new or empty, or with ``force`` a previous export, which is replaced.
    """
    return _publish(out_dir, force, lambda target, scratch: _write_transformers(checkpoint, target))


def _ct2_converter(hf_dir: Path, norm_first: bool):
    """CTranslate2's converter with its BART loader (the generic post-/pre-norm Transformer).

    Its Marian and Pegasus loaders assume the published models' conventions (Marian's dropped last
    vocabulary row, decoding started from EOS or PAD); ours start from BOS like our decoder.
    """
    ct2 = require("ctranslate2")
    from ctranslate2.converters.transformers import BartLoader

    class Loader(BartLoader):
        def get_model_spec(self, model):
            model.config.normalize_before = norm_first
            model.config.normalize_embedding = False
            return super().get_model_spec(model)

        def set_config(self, config, model, tokenizer):
            config.bos_token, config.decoder_start_token = "<s>", "<s>"
            config.eos_token, config.unk_token = "</s>", "<unk>"

    class Converter(ct2.converters.TransformersConverter):
        def _load(self):
            transformers = require("transformers")
            model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir))
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
            return Loader()(model, tokenizer)

    return Converter(str(hf_dir))


def export_ctranslate2(checkpoint: str | Path, out_dir: str | Path, quantization: str = "float32",
                       force: bool = False) -> Path:
    """Convert through the transformers export with CTranslate2's own converter (same ``force`` rule)."""
    from nmt.checkpoint import check_task, checkpoint_config, load_checkpoint

    if quantization not in QUANTIZATIONS:
        raise NMTError(f"unknown quantization {quantization!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    cfg = checkpoint_config(load_checkpoint(checkpoint))
    check_task(cfg, checkpoint)
    check_architecture(cfg)
    require("ctranslate2")
    norm_first = cfg.model.norm_first

    def write(target: Path, scratch: Path) -> None:
        hf_dir = _write_transformers(checkpoint, scratch / "hf")
        # target does not exist: the converter's force (an rmtree) is never needed
        _ct2_converter(hf_dir, norm_first).convert(
            str(target), quantization=None if quantization == "float32" else quantization)
        for name in ("source.spm", DECODE_FILE):
            shutil.copy(hf_dir / name, target / name)

    return _publish(out_dir, force, write)
