"""What the processes of a training run settle before its first step: that they start from the same
point, the prepared data (the first process on each machine writes the cache, the others read it) and the precision, which every
rank must share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from nmt import distributed as D
from nmt import precision as P
from nmt.config import Config
from nmt.data.prepare import PreparedData, prepare_on_each_machine
from nmt.errors import NMTError
from nmt.resume import Start, uses_parent_tokenizer
from nmt.tokenizer import Tokenizer


def check_same_start(start: Start, dist: D.DistInfo, run_dir: str) -> None:
    """Refuse to train when the ranks found different starting points (resumed or not, and at which
    step): each rank reads its own view of run_dir, so one that is not shared shows here, before a rank
    that resumed and one that did not wait for each other in different collectives."""
    if not dist.enabled:
        return
    mine = (start.kind, int(start.checkpoint["step"]) if start.kind == "resume" else 0)
    every = D.gather_objects(mine, dist)
    if len(set(every)) == 1:
        return
    seen = ", ".join(f"rank {rank}: " + (f"resumed at step {step}" if kind == "resume" else kind)
                     for rank, (kind, step) in enumerate(every))
    raise NMTError(f"the training processes start from different points ({seen}): run_dir {run_dir} is not "
                   "shared by all of them; put it on a filesystem every node sees, or clear it on every node")


def prepared_data(cfg: Config, start: Start, dist: D.DistInfo, log: Callable[[str], None]) -> PreparedData:
    """The first process on each machine tokenizes and writes the cache; the others wait, then
    memory-map it."""
    parent = None
    if uses_parent_tokenizer(start, cfg):
        parent = Tokenizer.from_state(start.checkpoint["tokenizer"])
    if dist.is_main:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    return prepare_on_each_machine(cfg, dist.local_rank, lambda: D.barrier(dist), log=log, tokenizer=parent)


def training_precision(cfg: Config, start: Start, model: torch.nn.Module, tokenizer: Tokenizer,
                       device: torch.device, dist: D.DistInfo) -> P.PrecisionChoice:
    """train.precision, with auto resolved for this device; all ranks agree on the result."""
    requested = cfg.train.precision
    previous = start.config.train.precision if start.kind == "resume" else None
    probe = None
    if requested == "auto" and device.type == "cpu":
        probe = P.training_step_probe(model, P.synthetic_step(
            model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, cfg.train.batch_tokens))
    choice = P.resolve_precision(requested, device.type, previous=previous, probe=probe,
                                 cuda_bf16=P.cuda_supports_bf16(device), flags=P.cpu_flags())
    # Processes that chose differently all take the more conservative choice.
    any_fp32, any_fp16 = D.any_rank([choice.precision == "fp32", choice.precision == "fp16"], dist, device)
    agreed = "fp32" if any_fp32 else "fp16" if any_fp16 else choice.precision
    if agreed != choice.precision:
        choice = P.PrecisionChoice(agreed, f"{choice.reason}; {agreed} because another process chose it")
    return choice
