"""Self-describing checkpoints: what a training run saves, atomic writes, safe (weights-only) loading,
averaging, and putting their state back (weights and optimizer state with errors that name the
mismatch, random generators)."""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from nmt.config import Config, config_from_dict, to_dict
from nmt.errors import NMTError

FORMAT_VERSION = 1
STEP_CHECKPOINT = re.compile(r"checkpoint_(\d+)\.pt$")


def weights_state(cfg: Config, tokenizer: Any, model: torch.nn.Module, step: int) -> dict[str, Any]:
    """What inference needs (best.pt): the config, the tokenizer, the weights and the step."""
    return {"config": to_dict(cfg), "tokenizer": tokenizer.to_state(), "model": model.state_dict(), "step": step}


def training_state(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                   sampler: dict[str, Any], train_state: dict[str, Any], rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """What an exact resume needs besides ``weights_state`` (last.pt): ``sampler`` is the batch
    order's position, ``rngs`` every rank's generators in rank order."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "sampler": sampler, "epoch": sampler["epoch"],
            "train_state": train_state, "rng": {"ranks": rngs}}


def save_last(state: dict[str, Any], directory: Path, step: int, keep_last: int,
              keep_steps: Collection[int] = ()) -> None:
    """``directory``/last.pt, and with ``keep_last`` > 0 a ``checkpoint_{step}.pt`` of the same bytes
    (all but the newest ``keep_last`` of those and the ones of ``keep_steps`` deleted)."""
    last = directory / "last.pt"
    save_or_fail(state, last)
    if keep_last <= 0 and step not in keep_steps:
        return
    step_ckpt = directory / f"checkpoint_{step}.pt"
    try:
        link_or_copy(last, step_ckpt)  # last.pt is later replaced by rename: this version stays
    except OSError as e:
        raise NMTError(f"could not save {step_ckpt}: {e.strerror or e}; {last} is intact") from None
    prune_step_checkpoints(directory, keep_last, keep_steps)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: temp file, fsync, rename, fsync the folder.

    A crash at any point leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Make ``target`` a hard link to ``source``, or an atomic copy where links fail.

    Some filesystems (FAT, many network and FUSE mounts) refuse hard links; ``source`` being replaced
    later by rename leaves either kind of ``target`` untouched.
    """
    source, target = Path(source), Path(target)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
        return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_or_fail(state: dict[str, Any], path: Path) -> None:
    """save_checkpoint, with a failed write (disk full, I/O error) as a one-line NMTError.

    The write is atomic, so the previous file at ``path`` (if any) is still there and loadable.
    """
    existed = path.is_file()
    try:
        save_checkpoint(state, path)
    except OSError as e:
        kept = f"; the previous {path.name} is intact" if existed else ""
        raise NMTError(f"could not save {path}: {e.strerror or e}{kept}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU; only tensors and plain data are accepted, nothing is executed."""
    path = Path(path)
    if not path.is_file():
        raise NMTError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(str(e))
        if "GLOBAL" in reason:
            raise NMTError(f"refusing to load {path}: it holds code or objects, not just tensors ({reason})") from None
        raise NMTError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    except Exception as e:  # noqa: BLE001 - corrupt bytes reach the unpickler as any error (KeyError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NMTError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise NMTError(f"{path} is not an nmt checkpoint (no format_version)")
    if state["format_version"] > FORMAT_VERSION:
        raise NMTError(f"{path} has format version {state['format_version']}; this nmt reads <= {FORMAT_VERSION}")
    return state


def _unpickling_reason(message: str) -> str:
    """The informative line of torch's weights-only error (it is wrapped in a long preamble)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith("Unsupported"):
            return ln
    return lines[-1] if lines else "unpickling failed"


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Any) -> None:
    """load_state_dict with an error that names every mismatching tensor."""
    own = model.state_dict()
    problems = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if problems or missing or unexpected:
        parts = ([f"shape mismatch: {', '.join(problems[:5])}"] if problems else []) + \
                ([f"missing: {', '.join(missing[:5])}"] if missing else []) + \
                ([f"unexpected: {', '.join(unexpected[:5])}"] if unexpected else [])
        raise NMTError(f"{source} does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(weights)


# How an optimizer computes its step. They belong to this run's device, not to the run that saved the
# state (a CPU run's foreach Adam resumed as fused Adam on a GPU); load_state_dict would take the saved
# ones, and also places the loaded state by them (fused Adam's step counts on the parameters' device).
KERNEL_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], source: Any) -> None:
    """optimizer.load_state_dict, keeping this optimizer's ``KERNEL_FLAGS``; a one-line error when the
    parameter groups do not match."""
    own = [{k: g[k] for k in KERNEL_FLAGS if k in g} for g in optimizer.param_groups]
    groups = [{**g, **own[i]} if i < len(own) else g for i, g in enumerate(state["param_groups"])]
    try:
        optimizer.load_state_dict({**state, "param_groups": groups})
    except ValueError as e:
        raise NMTError(f"the optimizer state of {source} does not fit this run ({e}; "
                       "train.weight_decay > 0 splits the parameters into two groups)") from None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: CPU, Python and (on CUDA) its own GPU's, no other GPU's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what ``rng_state`` took (a CUDA state only on a CUDA device)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_config(state: dict[str, Any]) -> Config:
    return config_from_dict(state["config"])


TASK_COMMANDS = {"translation": "nmt translate", "lm": "nmt generate", "mlm": "nmt fill-mask"}


def check_task(cfg: Config, source: Any, task: str = "translation") -> None:
    """A one-line error, naming the command that fits, when the checkpoint (or config) ``source``
    of config ``cfg`` was trained for another task than ``task``."""
    if cfg.task != task:
        raise NMTError(f"{source} is a task={cfg.task} model and this command needs task={task}: "
                       f"use {TASK_COMMANDS[cfg.task]}")


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", task: str = "translation"):
    """(model in eval mode on ``device``, tokenizer, config) from one checkpoint file, which must
    hold a model of ``task`` (see ``check_task``)."""
    from nmt.model import build_model
    from nmt.tokenizer import Tokenizer

    state = load_checkpoint(path)
    cfg = checkpoint_config(state)
    check_task(cfg, path, task)
    tokenizer = Tokenizer.from_state(state["tokenizer"])
    model = build_model(cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, cfg


def step_checkpoints(directory: str | Path) -> list[Path]:
    """``checkpoint_{step}.pt`` files in ``directory``, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("checkpoint_*.pt")
             if (m := STEP_CHECKPOINT.search(p.name))]
    return [p for _, p in sorted(found)]


def prune_step_checkpoints(directory: str | Path, keep: int, keep_steps: Collection[int] = ()) -> None:
    """Delete all step checkpoints but the newest ``keep`` and those of the steps in ``keep_steps``."""
    paths = step_checkpoints(directory)
    for p in paths[: max(0, len(paths) - keep)]:
        if checkpoint_step(p) not in keep_steps:
            p.unlink(missing_ok=True)


def checkpoint_step(path: str | Path) -> int:
    """The step of a ``checkpoint_{step}.pt`` path."""
    return int(STEP_CHECKPOINT.search(Path(path).name).group(1))


def average_checkpoints(paths: list[str | Path]) -> dict[str, Any]:
    """Average the model weights of ``paths``; the rest of the first checkpoint is kept (minus training state).

    Accumulates in float64 so that averaging many checkpoints loses no precision.
    """
    if not paths:
        raise NMTError("no checkpoints to average")
    first = load_checkpoint(paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    for p in paths[1:]:
        model = load_checkpoint(p)["model"]
        if model.keys() != total.keys():
            raise NMTError(f"{p} has different parameters from {paths[0]}; cannot average")
        for k, v in model.items():
            if v.shape != total[k].shape:
                raise NMTError(f"{p}: {k} has shape {tuple(v.shape)}, expected {tuple(total[k].shape)}")
            if v.is_floating_point():
                total[k] += v.double()
    averaged = {k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v
                for k, v in total.items()}
    keep = {k: first[k] for k in ("config", "tokenizer", "step") if k in first}
    return {**keep, "model": averaged, "averaged_from": [str(p) for p in paths]}
