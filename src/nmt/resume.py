"""Runs that start from a checkpoint: resuming their own ``last.pt``, or fine-tuning from a parent's.

Resume compares the config with the one the checkpoint was trained with. What the weights, the
tokenizer or the data position depend on cannot change (``FIXED_DATA``, the model's shape, the
tokenizer): such a change is refused before anything is written. Other changes (a longer
``train.max_steps``, a lower ``train.lr``) are listed in a warning, and the previous ``config.yaml``
is kept as ``config.<step>.yaml``.

Fine-tuning (``train.init_from``) encodes the new corpus with the parent's tokenizer unless
``train.init_vocab=new``; the ``train.init_*`` switches say what else is kept from the parent. A
language model (task lm) is a decoder-only translator with an empty source, so it starts a
decoder-only model of any task with all of its weights; a masked LM (task mlm) starts the encoder,
and the embeddings tied to it, of an encoder-decoder translator.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmt.checkpoint import load_checkpoint, load_model_weights, load_optimizer_state, set_rng_state
from nmt.config import Config, config_from_dict, dump_config, to_dict
from nmt.errors import NMTError
from nmt.optim import continue_schedule

CHANGEABLE_MODEL = frozenset({"model.dropout", "model.attention_dropout"})
FIXED_DATA = frozenset({"task", "data.lang", "data.src_lang", "data.tgt_lang", "data.dir", "data.train", "data.hf_name",
                        "data.hf_config", "data.hf_train_split", "data.max_len", "data.max_len_ratio"})
"""The training data: the sampler's position in an epoch means nothing on other data."""
BATCH_ORDER = frozenset({"train.batch_tokens", "train.seed"})
"""They change how an epoch is cut into batches: a resumed run starts its current epoch again."""
NOT_SETTINGS = frozenset({"run_dir"})


@dataclass
class TrainState:
    """Counters that travel in the checkpoint besides model/optimizer state."""

    step: int = 0
    best: float | None = None
    bad_validations: int = 0
    skipped_steps: int = 0
    consecutive_bad: int = 0
    stopped_early: bool = False
    top: list[list[float]] = field(default_factory=list)
    """[score, step] of the best ``train.keep_best`` validations, best first (higher is better)."""


@dataclass
class Start:
    """Where a run starts: ``kind`` is "fresh", "resume" (own last.pt) or "init" (train.init_from)."""

    kind: str
    path: Path | None = None
    checkpoint: dict[str, Any] | None = None
    config: Config | None = None
    """The config the checkpoint was trained with."""


def find_start(cfg: Config, last: Path) -> Start:
    for kind, path in (("resume", last), ("init", cfg.train.init_from)):
        if path and (kind == "init" or last.is_file()):
            ckpt = load_checkpoint(path)
            return Start(kind, Path(path), ckpt, config_from_dict(ckpt["config"]))
    return Start("fresh")


def uses_parent_tokenizer(start: Start, cfg: Config) -> bool:
    """Whether the data is encoded with the checkpoint's tokenizer: fine-tuning with init_vocab=parent,
    when it starts and whenever it resumes."""
    if start.kind == "init":
        return cfg.train.init_vocab == "parent"
    saved = start.config
    return start.kind == "resume" and bool(saved.train.init_from) and saved.train.init_vocab == "parent"


def start_config(start: Start, cfg: Config, log: Callable[[str], None]) -> Config:
    """Resume: refuse changes of what cannot change. Fine-tuning: the parent's tokenizer settings."""
    saved = start.config
    if start.kind == "init":
        check_parent(saved, cfg, start.path)
    if start.kind == "resume":
        if uses_parent_tokenizer(start, cfg):  # a fine-tuning run goes on with the parent's tokenizer
            cfg = dataclasses.replace(cfg, tokenizer=saved.tokenizer)
        refuse_fixed_changes(saved, cfg, start.path)
    elif uses_parent_tokenizer(start, cfg):
        return parent_tokenizer_config(cfg, saved, log)
    return cfg


def check_parent(parent: Config, cfg: Config, path: Any) -> None:
    """Refuse, before anything is written, a parent whose model cannot start this run's: a
    language model's weights are those of a decoder-only model, a masked LM's those of an encoder."""
    if parent.task == "lm" and cfg.model.arch != "decoder_only":
        raise NMTError(f"{path} is a language model (task=lm): it starts a model.arch=decoder_only model "
                       f"(e.g. a decoder-only translator), not model.arch={cfg.model.arch}")
    if parent.task == "mlm" and cfg.model.arch == "decoder_only":
        raise NMTError(f"{path} is a masked LM (task=mlm): it starts the encoder of a model.arch=encoder_decoder "
                       "model (or another encoder_only one), not model.arch=decoder_only")


def resume_from(start: Start, cfg: Config, parts: dict[str, Any], rank: int, world_size: int,
                device: torch.device, log: Callable[[str], None]) -> TrainState:
    """Put the run's own last.pt back: ``parts`` holds the run's model, optimizer, scheduler, scaler
    and sampler; returns the counters. Another world size is refused before anything changes."""
    ckpt, path = start.checkpoint, start.path
    load_model_weights(parts["model"], ckpt["model"], path)
    rng = rank_rng_state(ckpt["rng"], rank, world_size)  # refuses first
    load_optimizer_state(parts["optimizer"], ckpt["optimizer"], path)
    parts["scheduler"].load_state_dict(ckpt["scheduler"])
    if parts["scaler"].is_enabled() and not ckpt["scaler"]:
        log("the checkpoint was saved without fp16 loss scaling: starting a fresh loss scale")
    else:
        parts["scaler"].load_state_dict(ckpt["scaler"])  # a no-op when this run is not fp16
    sampler = parts["sampler"]
    sampler.load_state_dict(ckpt["sampler"])
    set_rng_state(rng, device)
    reordered = sorted(config_changes(start.config, cfg).keys() & BATCH_ORDER)
    if reordered:
        sampler.position = 0
        log(f"warning: {', '.join(reordered)} changed: epoch {sampler.epoch} starts again from its first batch")
    return TrainState(**ckpt["train_state"])


def write_run_config(start: Start, cfg: Config, run_dir: Path, step: int, comment: str,
                     log: Callable[[str], None]) -> None:
    """config.yaml of this invocation; on a resume with changed settings the previous one is kept."""
    if start.kind == "resume":
        changed = config_changes(start.config, cfg)
        if changed:
            kept = keep_config_history(run_dir, step)
            also = f"; the previous config.yaml is kept as {kept.name}" if kept else ""
            log(f"warning: resumed with changed settings: {describe(changed)}{also}")
    dump_config(cfg, run_dir / "config.yaml", comment=comment)


def init_from_parent(start: Start, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, log: Callable[[str], None]) -> int | None:
    """Fine-tuning: the parent's weights, and what the train.init_* switches keep besides; the
    parent's step with train.init_step, else None."""
    t, ckpt, path = cfg.train, start.checkpoint, start.path
    weights = ckpt["model"]
    fresh = vocabulary_tensors(model) if t.init_vocab == "new" else set()
    if start.config.model.arch == "encoder_only" and cfg.model.arch == "encoder_decoder":
        weights, fresh = pretrained_encoder(weights, model, fresh)
    elif fresh:
        own = model.state_dict()
        weights = {k: own[k] if k in fresh else v for k, v in weights.items()}
    load_model_weights(model, weights, path)
    kept = {"optimizer": t.init_optimizer, "scheduler": t.init_schedule, "step": t.init_step}
    missing = [k for k, keep in kept.items() if keep and k not in ckpt]
    if missing:
        raise NMTError(f"{path} has no {' or '.join(missing)} state (best.pt and averaged checkpoints keep "
                       "only weights); use its last.pt or turn the train.init_* switch off")
    if t.init_optimizer:
        load_optimizer_state(optimizer, ckpt["optimizer"], path)
    if t.init_schedule:
        continue_schedule(scheduler, int(ckpt["scheduler"]["last_epoch"]))
    what = ["weights"] + [k for k, keep in kept.items() if keep]
    vocab = "a new tokenizer, fresh embeddings" if t.init_vocab == "new" else "its tokenizer"
    log(f"fine-tuning from {path}: kept {', '.join(what)} and {vocab}")
    log(loaded_and_fresh(start.config, model, fresh))
    return int(ckpt["step"]) if t.init_step else None


def pretrained_encoder(parent: dict[str, torch.Tensor], model: torch.nn.Module,
                       fresh: set[str]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(weights, the names starting afresh) of ``model``, an encoder-decoder, with its encoder and the
    embeddings tied to the encoder's from the masked-LM (encoder-only) ``parent``, whose stack has the
    same names; the rest as initialised. ``fresh``: tensors kept as initialised anyway (a new
    vocabulary). A parent encoder of another shape is refused by ``load_model_weights``, naming the
    tensors: as unexpected ones (more layers), as a shape mismatch, or here as missing ones."""
    own = model.state_dict(keep_vars=True)
    encoder = {k for k in own if k.startswith("encoder.")}
    missing = sorted(encoder - set(parent))
    if missing:
        raise NMTError(f"the masked-LM parent does not fit this model's encoder (missing: {', '.join(missing[:5])}); "
                       "use its model.encoder_layers and model.norm_first")
    embedding = own["encoder.embed.token.weight"]
    tied = {k for k, v in own.items() if v is embedding}  # the decoder's and output embeddings, when tied
    loaded = (encoder | tied) - fresh
    weights = {k: (parent["encoder.embed.token.weight"] if k in tied else parent[k]) if k in loaded else v.detach()
               for k, v in own.items()}
    weights.update({k: parent[k] for k in set(parent) - set(own)})  # refused by name as unexpected
    return weights, set(own) - loaded


def loaded_and_fresh(parent: Config, model: torch.nn.Module, fresh: set[str]) -> str:
    """One log line: which of ``model``'s tensors came from the parent (of which task and arch),
    and which start afresh (a stack's layers named once, as ``decoder.layers.*``)."""
    names = list(model.state_dict())
    loaded = len(names) - len(fresh)
    shown = dict.fromkeys(re.sub(r"\.layers\.\d+\..*", ".layers.*", n) for n in names if n in fresh)
    return (f"loaded {loaded} of {len(names)} tensors from a task={parent.task} model.arch={parent.model.arch} "
            f"parent; starting afresh: {', '.join(shown) or 'none'}")


def flat(cfg: Config) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``: every setting by its override name."""
    return {f"{section}.{key}" if isinstance(values, dict) else section: value
            for section, values in to_dict(cfg).items()
            for key, value in (values.items() if isinstance(values, dict) else [(None, values)])}


def config_changes(saved: Config, current: Config) -> dict[str, tuple[Any, Any]]:
    """Settings that differ: name -> (saved value, current value)."""
    old, new = flat(saved), flat(current)
    return {k: (old.get(k), new[k]) for k in new if k not in NOT_SETTINGS and old.get(k) != new[k]}


def is_fixed(key: str) -> bool:
    return (key.startswith("tokenizer.") or key in FIXED_DATA
            or (key.startswith("model.") and key not in CHANGEABLE_MODEL))


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())


def refuse_fixed_changes(saved: Config, current: Config, last: Path) -> None:
    """One-line NMTError naming every setting that a resume cannot change."""
    fixed = {k: v for k, v in config_changes(saved, current).items() if is_fixed(k)}
    if fixed:
        raise NMTError(f"cannot resume {last} with changed settings: {describe(fixed)}; these must stay as "
                       f"trained (use another run_dir, or train.init_from={last} to fine-tune from it)")


def keep_config_history(run_dir: Path, step: int) -> Path | None:
    """Copy ``config.yaml`` to ``config.<step>.yaml`` (the settings used up to ``step``)."""
    current = run_dir / "config.yaml"
    if not current.is_file():
        return None
    kept = run_dir / f"config.{step}.yaml"
    shutil.copyfile(current, kept)
    return kept


def parent_tokenizer_config(cfg: Config, parent: Config, log: Callable[[str], None]) -> Config:
    """``cfg`` with the parent's tokenizer section (the parent's tokenizer is what encodes the data),
    but this run's ``tokenizer.text``: which text a language model's tokenizer was trained on says
    nothing about this run's task."""
    tokenizer = dataclasses.replace(parent.tokenizer, text=cfg.tokenizer.text)
    if cfg.tokenizer != tokenizer:
        ours, theirs = flat(cfg), flat(dataclasses.replace(parent, tokenizer=tokenizer))
        differ = ", ".join(f"{k}={ours[k]} (parent {theirs[k]})" for k in ours
                           if k.startswith("tokenizer.") and ours[k] != theirs[k])
        log(f"warning: {differ} not used: the parent's tokenizer encodes this corpus "
            "(train.init_vocab=new trains a new one)")
    return dataclasses.replace(cfg, tokenizer=tokenizer)


def rank_rng_state(saved: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's state out of a checkpoint's ``rng`` entry (one state per rank, in rank order).

    The data shards and the dropout streams belong to a world size, so another one cannot resume
    exactly: that is refused. Older checkpoints hold one state, which every rank takes.
    """
    if "ranks" not in saved:
        return saved
    saved_world = len(saved["ranks"])
    if saved_world != world_size:
        raise NMTError(
            f"last.pt was saved by {saved_world} training processes and this run has {world_size}: "
            f"an exact resume needs the same number (torchrun --nnodes x --nproc_per_node = {saved_world}); "
            "to go on with another number, start a new run_dir with train.init_from=<that last.pt>")
    return saved["ranks"][rank]


def vocabulary_tensors(model: torch.nn.Module) -> set[str]:
    """Names in ``model.state_dict()`` of the tensors indexed by token id (embeddings, output projection)."""
    vocab_modules = {id(m) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    vocab_modules.add(id(model.output_proj))
    weights = {id(p) for m in model.modules() if id(m) in vocab_modules for p in m.parameters(recurse=False)}
    return {name for name, t in model.state_dict(keep_vars=True).items() if id(t) in weights}
