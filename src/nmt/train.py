"""The training loop: train_step, validate, maybe_save, log; stoppable and exactly resumable."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nmt import distributed as D
from nmt import precision as P
from nmt import resume as R
from nmt.checkpoint import (
    link_or_copy,
    load_model_weights,
    load_optimizer_state,
    prune_step_checkpoints,
    rng_state,
    save_or_fail,
    set_rng_state,
)
from nmt.config import Config, dump_config, to_dict
from nmt.data.batching import Batch, TokenBatchSampler, collate
from nmt.data.prefetch import Prefetcher
from nmt.data.prepare import ParallelData, PreparedData, prepare_on_each_machine
from nmt.errors import NMTError
from nmt.evaluate import score
from nmt.loss import Objective
from nmt.model import build_model, count_parameters
from nmt.optim import build_optimizer, build_scheduler, continue_schedule
from nmt.run import MetricsLog, RunLock, StopSignal
from nmt.runtime import autocast_context, configure_math, keep_freed_memory, resolve_device
from nmt.tokenizer import PAD_ID, Tokenizer
from nmt.translate import translate_lines


@dataclass
class TrainState:
    """Counters that travel in the checkpoint besides model/optimizer state."""

    step: int = 0
    best: float | None = None
    bad_validations: int = 0
    skipped_steps: int = 0
    consecutive_bad: int = 0
    stopped_early: bool = False


def first_sentence(batch: Batch) -> Batch:
    """The batch's first pair alone (a stand-in pass that only has to touch every parameter)."""
    tgt_out = batch.tgt_out[:1]
    positions = torch.nonzero(tgt_out.reshape(-1) != PAD_ID).squeeze(1)
    return Batch(batch.src[:1], batch.tgt_in[:1], tgt_out, positions, positions.numel(),
                 int((batch.src[:1] != PAD_ID).sum()), batch.src[:1].numel() + tgt_out.numel())


class Trainer:
    """One training run: data, model, optimizer and starting point set up in ``__init__``, the loop in
    ``train()``."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        t = cfg.train
        self.cfg = cfg
        self.device = resolve_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = D.init_distributed(self.device.type)
        self.log_fn = log if self.dist.is_main else (lambda _msg: None)
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # before anything is written: a refused resume leaves the run as it was
        self.start = R.find_start(cfg, self.ckpt_dir / "last.pt")
        self.cfg = cfg = self._start_config(cfg)
        # before the slow set-up, so that a missing tensorboard package fails at once
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.dist.is_main else None,
                                  self.run_dir / "tb" if t.tensorboard else None)
        self.data = self._prepare_data()
        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, self.data.tokenizer.src_vocab_size,
                                 self.data.tokenizer.tgt_vocab_size).to(self.device)
        self.precision = self._resolve_precision()
        self.cfg = cfg = replace(cfg, train=replace(cfg.train, precision=self.precision.precision))
        t = cfg.train
        configure_math(self.device, t.precision)
        if self.dist.rank:  # same initial weights everywhere, but each rank its own dropout masks
            torch.manual_seed(t.seed + 1_000_003 * self.dist.rank)
        self.optimizer = build_optimizer(self.model, t)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.scheduler = build_scheduler(self.optimizer, t, cfg.model)
        self.sampler = TokenBatchSampler(
            self.data.train.src.lengths(np.int32), self.data.train.tgt.lengths(np.int32), t.batch_tokens,
            seed=t.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        self.state = TrainState()
        self._restore()
        self.net = self._build_net()
        self.batches = Prefetcher((collate(self.data.train, idx) for idx in self.sampler),
                                  self.sampler.state_dict, pin=self.device.type == "cuda")
        self._bad_cause = ""
        self._known_skip = False
        self._bar = tqdm(disable=True)
        # skipped updates and the current run of them, counted on the device: read at log/save steps
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_run = torch.full((), self.state.consecutive_bad, dtype=torch.int64, device=self.device)
        self._window = self._empty_window()

    def _build_net(self) -> torch.nn.Module:
        """The objective the loop calls: DDP-wrapped under torchrun, compiled with train.compile."""
        net: torch.nn.Module = Objective(self.model, self.cfg.train.label_smoothing)
        if self.dist.enabled:
            net = D.wrap(net, self.device)
        if self.cfg.train.compile:
            # dynamic: batches change shape every step; one graph serves them all
            net = torch.compile(net, dynamic=True)
        return net

    # -- setup ---------------------------------------------------------------------------------

    def _start_config(self, cfg: Config) -> Config:
        """Resume: refuse changes of what cannot change. Fine-tuning: the parent's tokenizer settings."""
        saved = self.start.config
        if self.start.kind == "resume":
            if self._parent_tokenizer(cfg):  # a fine-tuning run goes on with the parent's tokenizer
                cfg = replace(cfg, tokenizer=saved.tokenizer)
            R.refuse_fixed_changes(saved, cfg, self.start.path)
        elif self._parent_tokenizer(cfg):
            return R.parent_tokenizer_config(cfg, saved, self.log_fn)
        return cfg

    def _parent_tokenizer(self, cfg: Config) -> bool:
        """Whether the data is encoded with the checkpoint's tokenizer: fine-tuning with init_vocab=parent,
        when it starts and whenever it resumes."""
        if self.start.kind == "init":
            return cfg.train.init_vocab == "parent"
        saved = self.start.config
        return self.start.kind == "resume" and bool(saved.train.init_from) and saved.train.init_vocab == "parent"

    def _prepare_data(self) -> PreparedData:
        """The first process on each machine tokenizes and writes the cache; the others wait, then memory-map it."""
        parent = None
        if self._parent_tokenizer(self.cfg):
            parent = Tokenizer.from_state(self.start.checkpoint["tokenizer"])
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        return prepare_on_each_machine(self.cfg, self.dist.local_rank, lambda: D.barrier(self.dist),
                                       log=self.log_fn, tokenizer=parent)

    def _resolve_precision(self) -> P.PrecisionChoice:
        """train.precision, with auto resolved for this device; all ranks agree on the result."""
        requested = self.cfg.train.precision
        previous = self.start.config.train.precision if self.start.kind == "resume" else None
        probe = None
        if requested == "auto" and self.device.type == "cpu":
            tok = self.data.tokenizer
            probe = P.training_step_probe(self.model, P.synthetic_step(
                self.model, tok.src_vocab_size, tok.tgt_vocab_size, self.cfg.train.batch_tokens))
        choice = P.resolve_precision(requested, self.device.type, previous=previous, probe=probe,
                                     cuda_bf16=P.cuda_supports_bf16(self.device), flags=P.cpu_flags())
        # Processes that chose differently all take the more conservative choice.
        any_fp32, any_fp16 = D.any_rank([choice.precision == "fp32", choice.precision == "fp16"],
                                        self.dist, self.device)
        agreed = "fp32" if any_fp32 else "fp16" if any_fp16 else choice.precision
        if agreed != choice.precision:
            choice = P.PrecisionChoice(agreed, f"{choice.reason}; {agreed} because another process chose it")
        return choice

    def _restore(self) -> None:
        if self.start.kind == "resume":
            self._resume(self.start.checkpoint)
            self.log_fn(f"resumed from {self.start.path} at step {self.state.step}")
        elif self.start.kind == "init":
            self._init_from_parent(self.start.checkpoint, self.start.path)
        self.start.checkpoint = None  # the tensors are in the model and optimizer now

    def _resume(self, ckpt: dict[str, Any]) -> None:
        load_model_weights(self.model, ckpt["model"], self.ckpt_dir / "last.pt")
        rng = R.rank_rng_state(ckpt["rng"], self.dist.rank, self.dist.world_size)  # refuses first
        load_optimizer_state(self.optimizer, ckpt["optimizer"], self.ckpt_dir / "last.pt")
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and not ckpt["scaler"]:
            self.log_fn("the checkpoint was saved without fp16 loss scaling: starting a fresh loss scale")
        else:
            self.scaler.load_state_dict(ckpt["scaler"])  # a no-op when this run is not fp16
        self.sampler.load_state_dict(ckpt["sampler"])
        self.state = TrainState(**ckpt["train_state"])
        set_rng_state(rng, self.device)
        changed = R.config_changes(self.start.config, self.cfg)
        if changed.keys() & R.BATCH_ORDER:
            self.sampler.position = 0
            self.log_fn(f"warning: {', '.join(sorted(changed.keys() & R.BATCH_ORDER))} changed: epoch "
                        f"{self.sampler.epoch} starts again from its first batch")

    def _init_from_parent(self, ckpt: dict[str, Any], path: Path) -> None:
        """Fine-tuning: the parent's weights, and what the train.init_* switches keep besides."""
        t = self.cfg.train
        weights = ckpt["model"]
        if t.init_vocab == "new":
            fresh = R.vocabulary_tensors(self.model)
            own = self.model.state_dict()
            weights = {k: own[k] if k in fresh else v for k, v in weights.items()}
        load_model_weights(self.model, weights, path)
        kept = {"optimizer": t.init_optimizer, "scheduler": t.init_schedule, "step": t.init_step}
        missing = [k for k, keep in kept.items() if keep and k not in ckpt]
        if missing:
            raise NMTError(f"{path} has no {' or '.join(missing)} state (best.pt and averaged checkpoints keep "
                           "only weights); use its last.pt or turn the train.init_* switch off")
        if t.init_optimizer:
            load_optimizer_state(self.optimizer, ckpt["optimizer"], path)
        if t.init_schedule:
            continue_schedule(self.scheduler, int(ckpt["scheduler"]["last_epoch"]))
        if t.init_step:
            self.state.step = int(ckpt["step"])
        what = ["weights"] + [k for k, keep in kept.items() if keep]
        vocab = "a new tokenizer, fresh embeddings" if t.init_vocab == "new" else "its tokenizer"
        self.log_fn(f"fine-tuning from {path}: kept {', '.join(what)} and {vocab}")

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> TrainState:
        t = self.cfg.train
        if self.state.step >= t.max_steps:
            self.log_fn(f"already at step {self.state.step} >= train.max_steps={t.max_steps}; nothing to do")
            return self.state
        self._log_start()
        self.model.train()
        deadline = time.monotonic() + 60 * t.max_time_minutes if t.max_time_minutes else math.inf
        with StopSignal() as stop, self._progress_bar() as self._bar:
            while self._more_steps():
                self._known_skip = False
                stopping, out_of_time = self.train_step([stop.requested, time.monotonic() > deadline])
                # an attempted update; skipped ones are taken back when the device counters are read
                self.state.step += 1
                if self._known_skip:
                    self._sync_counters()
                else:
                    self._bar.update(1)
                    self.maybe_log()
                    self.maybe_validate()
                if not self._known_skip or stopping:
                    self.maybe_save(force=stopping)
                if stopping:
                    self.log_fn(f"stop requested: saved {self.ckpt_dir / 'last.pt'} at step {self.state.step}")
                    return self.state
                self._check_bad_steps()
                if out_of_time:
                    self.log_fn(f"train.max_time_minutes={t.max_time_minutes} reached at step {self.state.step}")
                    break
        if self.cfg.train.valid_every == 0 or self.state.step % self.cfg.train.valid_every:
            self.validate()
        self.maybe_save(force=True)
        return self.state

    def _more_steps(self) -> bool:
        if self.state.step >= self.cfg.train.max_steps:
            self._sync_counters()  # updates skipped on the device do not count towards max_steps
        return self.state.step < self.cfg.train.max_steps and not self.state.stopped_early

    def _progress_bar(self) -> tqdm:
        """A step bar on rank 0 when stderr is a terminal (log files get the plain log lines only)."""
        show = self.dist.is_main and sys.stderr.isatty()
        return tqdm(total=self.cfg.train.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                    disable=not show, leave=False)

    def train_step(self, flags: Sequence[bool] = ()) -> list[bool]:
        """One optimizer update over ``accum_steps`` batches; skips updates with non-finite gradients
        or an out-of-memory error on any rank. ``flags`` (stop requests) are OR-ed over the ranks in
        the same exchange as that decision, and returned. No host sync on a healthy step."""
        batches = [next(self.batches) for _ in range(self.cfg.train.accum_steps)]
        n_tokens = D.sum_over_ranks(float(sum(b.n_tgt_tokens for b in batches)), self.dist)
        # d(objective)/d(summed loss): DDP averages gradients over ranks, so world / tokens makes
        # the result a per-token mean overall; times the fp16 loss scale (a device tensor, no sync)
        grad_scale = self.scaler.scale(torch.full((), self.dist.world_size / n_tokens, device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        oom = self._forward_backward(batches, grad_scale)
        oom, *flags = D.any_rank([oom, *flags], self.dist)
        if oom:
            self._skip_update("oom", "out of memory on " + ("batch shapes " + ", ".join(
                f"src {tuple(b.src.shape)} tgt {tuple(b.tgt_out.shape)}" for b in batches)
                if self._oom_here else "another rank"))
        else:
            self._optimizer_step()
        return flags

    def _forward_backward(self, batches: list[Batch], grad_scale: torch.Tensor) -> bool:
        """Gradients of all ``batches``; True when this rank ran out of memory.

        Under DDP a rank that runs out of memory before the last (synchronising) backward still
        joins the gradient exchange with a stand-in pass, so that all ranks meet in the same
        collectives and then skip the update together. Out of memory inside that exchange cannot be
        rejoined (half the gradient buckets are in flight), so it stops this process with an error;
        torchrun then stops the others.
        """
        self._oom_here = False
        exchanging = False
        try:
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                sync = contextlib.nullcontext() if last or not self.dist.enabled else self.net.no_sync()
                with sync:
                    batch = batch.to(self.device, non_blocking=True)
                    loss, nll = self._forward(batch, grad_scale)
                    exchanging = last and self.dist.enabled
                    (loss * grad_scale).backward()
                self._accumulate(batch, loss, nll)
            return False
        except torch.cuda.OutOfMemoryError:
            if exchanging:
                raise NMTError(f"rank {self.dist.rank} ran out of memory during the gradient exchange at step "
                               f"{self.state.step + 1}; try a smaller train.batch_tokens or data.max_len") from None
            self._oom_here = True
            self._free_memory()
            if self.dist.enabled:
                loss, _ = self._forward(first_sentence(batches[-1]).to(self.device), None)
                (loss * 0.0).backward()
            return True

    def _free_memory(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _skip_update(self, cause: str, why: str) -> None:
        """Drop this update (a cause the host knows of) and count it; the loop then reads the counters,
        which takes the step and the schedule back."""
        self._free_memory()
        self._step_schedule()
        self._count_update(torch.ones((), dtype=torch.bool, device=self.device))
        self._known_skip = True
        self._bad_cause = cause
        self.log_fn(f"warning: step {self.state.step + 1}: {why}; update skipped")

    def _step_schedule(self) -> None:
        with warnings.catch_warnings():
            # Every attempted update moves the schedule; _sync_counters takes skipped ones back.
            # torch warns when the schedule moves before any optimizer step.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()

    def _count_update(self, bad: torch.Tensor) -> None:
        """Device-side counters: skipped updates and the current run of consecutive skipped ones."""
        self._skipped += bad
        self._bad_run = (self._bad_run + 1) * bad

    def _sync_counters(self) -> None:
        """Read the device counters into ``self.state`` (log, validation and save steps, and after a
        skip the host knows of). A skipped update is no step, as in fairseq: the step counter and the
        schedule, which count every attempted update in between, are taken back by the skipped ones."""
        skipped, run = torch.stack([self._skipped, self._bad_run]).tolist()
        self._skipped.zero_()
        self.state.skipped_steps += skipped
        self.state.consecutive_bad = run
        if skipped:
            self.state.step -= skipped
            continue_schedule(self.scheduler, self.scheduler.last_epoch - skipped)
            if not self._known_skip:  # decided on the device: a non-finite gradient
                self._bad_cause = "nonfinite"

    def _forward(self, batch: Batch, grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_context(self.device, self.cfg.train.precision):
            return self.net(batch.src, batch.tgt_in, batch.tgt_positions, batch.targets(), grad_scale)

    def _optimizer_step(self) -> None:
        """Clip, then update unless a gradient is non-finite.

        The skip is decided on the device where the optimizer can take it there: fused Adam (CUDA)
        skips its whole update, step count included, when handed ``found_inf``, and the fp16
        GradScaler does exactly that. Only the foreach optimizer (the CPU, where the host is the
        device and a sync waits for nothing) needs the decision on the host.
        """
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.clip_norm if self.cfg.train.clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        bad = ~torch.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.optimizer.defaults.get("fused"):
            self.optimizer.grad_scale, self.optimizer.found_inf = None, bad.float()
            self.optimizer.step()
        elif not bad.item():
            self.optimizer.step()
        else:
            self._skip_update("nonfinite", "non-finite gradients")
            return
        self._step_schedule()
        self._count_update(bad)
        self._window["grad_norm"] += torch.where(bad, 0.0, grad_norm.detach().float())
        self._window["good"] += ~bad

    def _check_bad_steps(self) -> None:
        bad = self.state.consecutive_bad
        if bad < self.cfg.train.max_bad_steps:
            return
        self.maybe_save(force=True)
        saved = f"stopped at step {self.state.step} and saved {self.ckpt_dir / 'last.pt'}"
        if self._bad_cause == "oom":
            raise NMTError(f"{bad} updates in a row ran out of memory; {saved}. "
                           "Try a smaller train.batch_tokens or data.max_len")
        raise NMTError(f"{bad} updates in a row had non-finite gradients; {saved}. "
                       "Try train.precision=bf16 or a lower train.lr")

    # -- logging -------------------------------------------------------------------------------

    def _empty_window(self) -> dict[str, Any]:
        zero = torch.zeros((), device=self.device)
        return {"loss": zero.clone(), "nll": zero.clone(), "grad_norm": zero.clone(),
                "good": torch.zeros((), dtype=torch.int64, device=self.device), "tokens": 0,
                "real": 0, "padded": 0, "steps": 0, "start": time.perf_counter()}

    def _accumulate(self, batch: Batch, loss: torch.Tensor, nll: torch.Tensor) -> None:
        w = self._window
        w["loss"] += loss.detach()
        w["nll"] += nll
        w["tokens"] += batch.n_tgt_tokens
        w["real"] += batch.n_src_tokens + batch.n_tgt_tokens
        w["padded"] += batch.padded_tokens

    def maybe_log(self) -> None:
        self._window["steps"] += 1
        step = self.state.step
        if step % self.cfg.train.log_every and step != self.cfg.train.max_steps:
            return
        w = self._window
        first_skip = self.state.skipped_steps
        self._sync_counters()
        if self.state.skipped_steps > first_skip:
            n, first = self.state.skipped_steps - first_skip, step - w["steps"] + 1
            where = f"step {step}" if first == step else f"steps {first}-{step}"
            self.log_fn(f"warning: {where}: non-finite gradients; update skipped" + (f" ({n} times)" if n > 1 else ""))
        if self.state.step != step:  # the update just attempted was one of them: no step to log yet
            return
        totals = torch.stack([w["loss"], w["nll"], torch.tensor(float(w["tokens"]), device=self.device)])
        loss, nll, tokens = D.all_reduce_sum_(totals, self.dist).tolist()
        good = int(w["good"])
        elapsed = time.perf_counter() - w["start"]
        if tokens == 0:  # every update of the window was skipped (out of memory): nothing to average
            self._window = self._empty_window()
            return
        record = {
            "step": step, "loss": loss / tokens, "nll_loss": nll / tokens, "ppl": math.exp(min(nll / tokens, 50)),
            "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(w["grad_norm"]) / max(good, 1),
            "tokens_per_s": tokens / elapsed, "padding_efficiency": w["real"] / max(w["padded"], 1),
            "skipped_steps": self.state.skipped_steps, "epoch": self.batches.position_dict["epoch"],
        }
        self.metrics.write(record)
        self._bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.2e} "
                                  f"{record['tokens_per_s']:,.0f} tok/s", refresh=False)
        self.log_fn(f"step {step:>7} | loss {record['loss']:.3f} | ppl {record['ppl']:8.2f} | lr {record['lr']:.2e} "
                    f"| {record['tokens_per_s']:,.0f} tgt tok/s | pad eff {record['padding_efficiency']:.2f}")
        self._window = self._empty_window()

    def _log_start(self) -> None:
        t, tok = self.cfg.train, self.data.tokenizer
        effective = t.batch_tokens * t.accum_steps * self.dist.world_size
        self.log_fn(f"model: {count_parameters(self.model):,} parameters; vocab src {tok.src_vocab_size} "
                    f"tgt {tok.tgt_vocab_size}; device {self.device}; precision {t.precision}")
        self.log_fn(f"precision {t.precision}: {self.precision.reason}")
        self.log_fn(f"effective batch: {t.batch_tokens} tokens x {t.accum_steps} accum x "
                    f"{self.dist.world_size} processes = {effective} tokens per side")
        if self.dist.is_main:
            self._write_config()

    def _write_config(self) -> None:
        """config.yaml of this invocation; on a resume with changed settings the previous one is kept."""
        if self.start.kind == "resume":
            changed = R.config_changes(self.start.config, self.cfg)
            if changed:
                kept = R.keep_config_history(self.run_dir, self.state.step)
                also = f"; the previous config.yaml is kept as {kept.name}" if kept else ""
                self.log_fn(f"warning: resumed with changed settings: {R.describe(changed)}{also}")
        dump_config(self.cfg, self.run_dir / "config.yaml",
                    comment=f"train.precision: {self.precision.reason}")

    # -- validation and checkpoints ------------------------------------------------------------

    def maybe_validate(self) -> None:
        every = self.cfg.train.valid_every
        if every and self.state.step % every == 0:
            self.validate()

    def validate(self) -> dict[str, float] | None:
        """Validation loss and BLEU on rank 0; updates best.pt and early stopping."""
        stop = False
        result = None
        if self.dist.is_main:
            result = evaluate_model(self.model, self.data, self.cfg, self.device)
            result["step"] = self.state.step
            self.metrics.write(result)
            self.log_fn(f"valid step {self.state.step:>7} | loss {result['valid_loss']:.3f} | "
                        f"ppl {result['valid_ppl']:.2f} | BLEU {result['valid_bleu']:.2f} | chrF {result['valid_chrf']:.2f}")
            stop = self._update_best(result)
        self.state.stopped_early = D.any_rank([stop], self.dist, self.device)[0]
        return result

    def _update_best(self, result: dict[str, float]) -> bool:
        """Save best.pt on improvement; True when patience has run out."""
        value = result["valid_bleu"] if self.cfg.train.best_metric == "bleu" else -result["valid_loss"]
        if self.state.best is None or value > self.state.best:
            self.state.best = value
            self.state.bad_validations = 0
            save_or_fail(self._checkpoint_state(full=False), self.ckpt_dir / "best.pt")
            return False
        self.state.bad_validations += 1
        patience = self.cfg.train.patience
        if patience and self.state.bad_validations >= patience:
            self.log_fn(f"early stopping: no improvement in {patience} validations")
            return True
        return False

    def maybe_save(self, force: bool = False) -> None:
        t = self.cfg.train
        if not force and self.state.step % t.save_every:
            return
        self._sync_counters()
        rngs = D.gather_objects(rng_state(self.device), self.dist)  # every rank takes part
        if not self.dist.is_main:
            return
        last = self.ckpt_dir / "last.pt"
        save_or_fail({**self._checkpoint_state(full=True), "rng": {"ranks": rngs}}, last)
        if t.keep_last > 0:
            step_ckpt = self.ckpt_dir / f"checkpoint_{self.state.step}.pt"
            try:
                link_or_copy(last, step_ckpt)  # last.pt is later replaced by rename: this version stays
            except OSError as e:
                raise NMTError(f"could not save {step_ckpt}: {e.strerror or e}; {last} is intact") from None
            prune_step_checkpoints(self.ckpt_dir, t.keep_last)

    def _checkpoint_state(self, full: bool) -> dict[str, Any]:
        state = {"config": to_dict(self.cfg), "tokenizer": self.data.tokenizer.to_state(),
                 "model": self.model.state_dict(), "step": self.state.step}
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict(), sampler=self.batches.position_dict,
                         epoch=self.batches.position_dict["epoch"], train_state=asdict(self.state),
                         rng={"ranks": [rng_state(self.device)]})
        return state


@torch.inference_mode()
def evaluate_model(model, data: PreparedData, cfg: Config, device: torch.device) -> dict[str, float]:
    """Teacher-forced NLL per token and detokenized BLEU/chrF on the validation split."""
    was_training = model.training
    model.eval()
    valid = data.valid
    objective = Objective(model, 0.0)
    nll, tokens = torch.zeros((), device=device), 0  # summed on the device: one host sync at the end
    with autocast_context(device, cfg.train.precision):
        for batch in iter_batches(valid, cfg.train.batch_tokens):
            batch = batch.to(device)
            nll += objective(batch.src, batch.tgt_in, batch.tgt_positions, batch.targets())[1]
            tokens += batch.n_tgt_tokens
    limit = cfg.data.max_valid_sentences or len(valid.src_text)
    search = "greedy" if cfg.train.valid_beam == 1 else "beam"
    decode_cfg = cfg.decode.__class__(**{**asdict(cfg.decode), "beam": cfg.train.valid_beam, "nbest": 1})
    hyps = list(translate_lines(model, data.tokenizer, valid.src_text[:limit], decode_cfg, device,
                                cfg.train.precision, search=search))
    scores = score(hyps, valid.tgt_text[:limit], cfg.data.tgt_lang)
    model.train(was_training)
    loss = float(nll) / max(tokens, 1)
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50)), "valid_bleu": scores["bleu"],
            "valid_chrf": scores["chrf"]}


def iter_batches(data: ParallelData, batch_tokens: int) -> Iterator[Batch]:
    sampler = TokenBatchSampler(data.src.lengths(), data.tgt.lengths(), batch_tokens, seed=0, shuffle=False)
    for indices in sampler:
        yield collate(data, indices)


def train(cfg: Config, log: Callable[[str], None] = print) -> TrainState:
    """Train (or resume) the run described by ``cfg``; the entry point of ``nmt train``."""
    run_dir = Path(cfg.run_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes the run's shared files
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_main:
            probe = run_dir / ".write_test"
            probe.touch()
            probe.unlink()
    except OSError as e:
        raise NMTError(f"run_dir {run_dir} is not writable: {e.strerror}") from None
    lock = RunLock(run_dir) if is_main else contextlib.nullcontext()
    with lock:
        trainer = Trainer(cfg, log)
        try:
            return trainer.train()
        finally:
            trainer.batches.close()
            trainer.metrics.close()
            D.shutdown(trainer.dist)


