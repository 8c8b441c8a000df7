"""The training loop: train_step, validate, maybe_save, log; stoppable and exactly resumable."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nmt import distributed as D
from nmt import resume as R
from nmt import startup as S
from nmt.checkpoint import rng_state, save_last, save_or_fail, training_state, weights_state
from nmt.config import Config
from nmt.data.batching import Batch, TokenBatchSampler, collate, epoch_lengths
from nmt.data.prefetch import Prefetcher
from nmt.errors import NMTError
from nmt.model import build_model, count_parameters
from nmt.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    continue_schedule,
    step_schedule,
    uses_fused,
)
from nmt.resume import TrainState
from nmt.run import LogWindow, MetricsLog, RunLock, StopSignal, check_writable
from nmt.runtime import autocast_context, configure_math, keep_freed_memory, resolve_device
from nmt.skips import SkipCounter
from nmt.tasks import OBJECTIVES, batch_maker
from nmt.tokenizer import PAD_ID
from nmt.validate import Validator


class Trainer:
    """One training run: data, model, optimizer and starting point set up in ``__init__``, the loop in
    ``train()``."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        t = cfg.train
        self.cfg = cfg
        self.device = resolve_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = D.init_distributed(self.device.type, t.dist_timeout_minutes)
        self.log_fn = log if self.dist.is_main else (lambda _msg: None)
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # before anything is written: a refused resume leaves the run as it was
        self.start = R.find_start(cfg, self.ckpt_dir / "last.pt")
        S.check_same_start(self.start, self.dist, cfg.run_dir)
        self.cfg = cfg = R.start_config(self.start, cfg, self.log_fn)
        # before the slow set-up, so that a missing tensorboard package fails at once
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.dist.is_main else None,
                                  self.run_dir / "tb" if t.tensorboard else None)
        self.data = S.prepared_data(self.cfg, self.start, self.dist, self.log_fn)
        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, self.data.tokenizer.src_vocab_size,
                                 self.data.tokenizer.tgt_vocab_size).to(self.device)
        self.precision = S.training_precision(self.cfg, self.start, self.model, self.data.tokenizer, self.device,
                                              self.dist)
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
            seed=t.seed, rank=self.dist.rank, world_size=self.dist.world_size,
            epoch_lengths=epoch_lengths(self.data) if self.data.train_samples else None)
        self.state = TrainState()
        self._restore()
        self.net = self._build_net()
        batches = (collate(self.data.train_for_epoch(epoch), idx) for epoch, idx in self.sampler.numbered())
        self.batches = Prefetcher(batches, self.sampler.state_dict, pin=self.device.type == "cuda")
        self.make_batch = batch_maker(cfg.task, self.data.tokenizer)
        self.skips = SkipCounter(self.device, self.state.step, self.state.skipped_steps, self.state.consecutive_bad)
        self.validator = Validator(cfg, self.data, self.device, self.dist, self.metrics, self.log_fn,
                                   save_best=lambda: save_or_fail(self._weights(), self.ckpt_dir / "best.pt"))
        self._bar = tqdm(disable=True)
        self._window = LogWindow(self.device)

    def _build_net(self) -> torch.nn.Module:
        """The objective the loop calls: DDP-wrapped under torchrun, compiled with train.compile."""
        net: torch.nn.Module = OBJECTIVES[self.cfg.task](self.model, self.cfg.train.label_smoothing)
        if self.dist.enabled:
            net = D.wrap(net, self.device)
        if self.cfg.train.compile:
            # dynamic: batches change shape every step; one graph serves them all
            net = torch.compile(net, dynamic=True)
        return net

    def _restore(self) -> None:
        if self.start.kind == "resume":
            parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                     "scaler": self.scaler, "sampler": self.sampler}
            self.state = R.resume_from(self.start, self.cfg, parts, self.dist.rank, self.dist.world_size,
                                       self.device, self.log_fn)
            self.log_fn(f"resumed from {self.start.path} at step {self.state.step}")
        elif self.start.kind == "init":
            step = R.init_from_parent(self.start, self.cfg, self.model, self.optimizer, self.scheduler, self.log_fn)
            self.state.step = self.state.step if step is None else step
        self.start.checkpoint = None  # the tensors are in the model and optimizer now

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
                stopping, out_of_time = self.train_step([stop.requested, time.monotonic() > deadline])
                self.state.step = self.skips.applied
                if self.skips.known:
                    self._read_skips()
                else:
                    self._bar.update(1)
                    self.maybe_log()
                    if self.validator.due(self.state.step):
                        self.validate()
                if not self.skips.known or stopping:
                    self.maybe_save(force=stopping)
                if stopping:
                    self.log_fn(f"stop requested: saved {self.ckpt_dir / 'last.pt'} at step {self.state.step}")
                    return self.state
                self._check_bad_steps()
                if out_of_time:
                    self.log_fn(f"train.max_time_minutes={t.max_time_minutes} reached at step {self.state.step}")
                    break
        if not self.validator.due(self.state.step):
            self.validate()
        self.maybe_save(force=True)
        return self.state

    def _more_steps(self) -> bool:
        if self.state.step >= self.cfg.train.max_steps:
            self._read_skips()  # updates skipped on the device do not count towards max_steps
        return self.state.step < self.cfg.train.max_steps and not self.state.stopped_early

    def _progress_bar(self) -> tqdm:
        """A step bar on rank 0 when stderr is a terminal (log files get the plain log lines only)."""
        show = self.dist.is_main and sys.stderr.isatty()
        return tqdm(total=self.cfg.train.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                    disable=not show, leave=False)

    def train_step(self, flags: Sequence[bool] = ()) -> list[bool]:
        """One optimizer update over ``accum_steps`` batches, skipped when a gradient is non-finite or
        any rank ran out of memory. ``flags`` (stop requests) travel in the exchange where the ranks
        agree on that, and come back OR-ed over the ranks. No host sync on a healthy step."""
        batches = [self.make_batch(next(self.batches)) for _ in range(self.cfg.train.accum_steps)]
        grad_scale = self._grad_scale(batches)
        self.optimizer.zero_grad(set_to_none=True)
        oom = self._forward_backward(batches, grad_scale)
        oom, *flags = D.any_rank([oom, *flags], self.dist)
        if oom:
            self._skip_update("oom", "out of memory on " + (_shapes(batches) if self._oom_here else "another rank"))
        else:
            self._optimizer_step(self._clip())
        step_schedule(self.scheduler)  # _read_skips takes skipped updates back
        return flags

    def _grad_scale(self, batches: list[Batch]) -> torch.Tensor:
        """d(objective)/d(summed loss): DDP averages gradients over ranks, so world / tokens makes the
        result a per-token mean overall; times the fp16 loss scale (a device tensor, no sync)."""
        n_tokens = D.sum_over_ranks(float(sum(b.n_tgt_tokens for b in batches)), self.dist)
        return self.scaler.scale(torch.full((), self.dist.world_size / n_tokens, device=self.device))

    def _forward_backward(self, batches: list[Batch], grad_scale: torch.Tensor) -> bool:
        """Gradients of all ``batches``; True when this rank ran out of memory.

        Under DDP a rank that runs out of memory before the last (synchronising) backward still
        joins the gradient exchange with a stand-in pass, so that all ranks meet in the same
        collectives and then skip the update together. Out of memory inside that exchange, or again
        in the stand-in pass, cannot be rejoined: it stops this process with an error, and torchrun
        then stops the others.
        """
        self._oom_here = self._exchanging = False
        try:
            self._accumulate_gradients(batches, grad_scale)
            return False
        except torch.cuda.OutOfMemoryError:
            pass
        except RuntimeError as e:  # a collective whose peer is gone (gloo); anything else is raised as it is
            if not self._exchanging:
                raise
            raise NMTError(f"rank {self.dist.rank}: the gradient exchange at step {self.state.step + 1} failed, "
                           f"most likely because another process stopped (its error says why): "
                           f"{str(e).strip().splitlines()[0]}") from None
        # Recovery starts outside the except block: the traceback held the failed pass's activations.
        if self._exchanging:
            raise NMTError(f"rank {self.dist.rank} ran out of memory during the gradient exchange at step "
                           f"{self.state.step + 1}; try a smaller train.batch_tokens or data.max_len")
        self._oom_here = True
        self._free_memory()
        if self.dist.enabled:
            self._stand_in_pass(batches[-1])
        return True

    def _accumulate_gradients(self, batches: list[Batch], grad_scale: torch.Tensor) -> None:
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.net.no_sync()
            with sync:
                batch = batch.to(self.device, non_blocking=True)
                loss, nll = self._forward(batch, grad_scale)
                self._exchanging = last and self.dist.enabled
                (loss * grad_scale).backward()
            self._accumulate(batch, loss, nll)

    def _stand_in_pass(self, batch: Batch) -> None:
        """Zero gradients of the batch's first sentence, through the collectives the other ranks are in."""
        try:
            loss, _ = self._forward(first_sentence(batch).to(self.device), None)
            (loss * 0.0).backward()
            return
        except torch.cuda.OutOfMemoryError:
            pass
        raise NMTError(f"rank {self.dist.rank} ran out of memory again in the stand-in pass at step "
                       f"{self.state.step + 1}; try a smaller train.batch_tokens or data.max_len "
                       f"({self.ckpt_dir / 'last.pt'} is as last saved)")

    def _forward(self, batch: Batch, grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_context(self.device, self.cfg.train.precision):
            return self.net(batch.src, batch.tgt_in, batch.tgt_positions, batch.targets(), grad_scale)

    def _clip(self) -> torch.Tensor:
        """Unscale, clip to train.clip_norm (0: no clipping); the gradient norm, on the device."""
        self.scaler.unscale_(self.optimizer)
        return clip_gradients(self.model.parameters(), self.cfg.train.clip_norm)

    def _optimizer_step(self, grad_norm: torch.Tensor) -> None:
        """Update unless a gradient is non-finite, and count the update as applied or skipped.

        The skip is decided on the device where the optimizer can take it there: fused Adam (CUDA)
        skips its whole update, step count included, when handed ``found_inf``, and the fp16
        GradScaler does exactly that. Only the foreach optimizer (the CPU, where the host is the
        device and a sync waits for nothing) needs the decision on the host.
        """
        bad = ~torch.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif uses_fused(self.optimizer):
            self.optimizer.grad_scale, self.optimizer.found_inf = None, bad.float()
            self.optimizer.step()
        elif not bad.item():
            self.optimizer.step()
        else:
            self._skip_update("nonfinite", "non-finite gradients")
            return
        self.skips.record(bad)
        self._window.add_update(grad_norm, bad)

    def _skip_update(self, cause: str, why: str) -> None:
        """Drop this update for a cause the host knows of."""
        self._free_memory()
        self.skips.skip(cause)
        self.log_fn(f"warning: step {self.state.step + 1}: {why}; update skipped")

    def _free_memory(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _read_skips(self) -> None:
        """The skip counts on the host (log, validation and save steps, and after a skip the host knows
        of). A skipped update is no step, as in fairseq: the schedule, which moved on every attempt
        in between, is taken back by the skipped ones."""
        skipped = self.skips.read()
        self.state.step = self.skips.applied
        self.state.skipped_steps, self.state.consecutive_bad = self.skips.skipped, self.skips.consecutive
        if skipped:
            continue_schedule(self.scheduler, self.scheduler.last_epoch - skipped)

    def _check_bad_steps(self) -> None:
        bad = self.state.consecutive_bad
        if bad < self.cfg.train.max_bad_steps:
            return
        self.maybe_save(force=True)
        saved = f"stopped at step {self.state.step} and saved {self.ckpt_dir / 'last.pt'}"
        if self.skips.cause == "oom":
            raise NMTError(f"{bad} updates in a row ran out of memory; {saved}. "
                           "Try a smaller train.batch_tokens or data.max_len")
        raise NMTError(f"{bad} updates in a row had non-finite gradients; {saved}. "
                       "Try train.precision=bf16 or a lower train.lr")

    # -- logging -------------------------------------------------------------------------------

    def _accumulate(self, batch: Batch, loss: torch.Tensor, nll: torch.Tensor) -> None:
        self._window.add_batch(loss, nll, batch.n_tgt_tokens, batch.n_src_tokens + batch.n_tgt_tokens,
                               batch.padded_tokens)

    def maybe_log(self) -> None:
        self._window.steps += 1
        step = self.state.step
        if step % self.cfg.train.log_every and step != self.cfg.train.max_steps:
            return
        first_skip = self.state.skipped_steps
        self._read_skips()
        if self.state.skipped_steps > first_skip:
            n, first = self.state.skipped_steps - first_skip, step - self._window.steps + 1
            where = f"step {step}" if first == step else f"steps {first}-{step}"
            self.log_fn(f"warning: {where}: non-finite gradients; update skipped" + (f" ({n} times)" if n > 1 else ""))
        if self.state.step != step:  # the update just attempted was one of them: no step to log yet
            return
        summary = self._window.summary(self.dist)
        self._window = LogWindow(self.device)
        if summary is None:  # every update of the window was skipped (out of memory): nothing to average
            return
        record = {"step": step, **summary, "lr": self.scheduler.get_last_lr()[0],
                  "skipped_steps": self.state.skipped_steps, "epoch": self.batches.position_dict["epoch"]}
        self.metrics.write(record)
        self._bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.2e} "
                                  f"{record['tokens_per_s']:,.0f} tok/s", refresh=False)
        self.log_fn(f"step {step:>7} | loss {record['loss']:.3f} | ppl {record['ppl']:8.2f} | lr {record['lr']:.2e} "
                    f"| {record['tokens_per_s']:,.0f} tgt tok/s | pad eff {record['padding_efficiency']:.2f}")

    def _log_start(self) -> None:
        t, tok = self.cfg.train, self.data.tokenizer
        effective = t.batch_tokens * t.accum_steps * self.dist.world_size
        self.log_fn(f"model: {count_parameters(self.model):,} parameters; vocab src {tok.src_vocab_size} "
                    f"tgt {tok.tgt_vocab_size}; device {self.device}; precision {t.precision}")
        self.log_fn(f"precision {t.precision}: {self.precision.reason}")
        self.log_fn(f"effective batch: {t.batch_tokens} tokens x {t.accum_steps} accum x "
                    f"{self.dist.world_size} processes = {effective} tokens per side")
        if self.dist.is_main:
            R.write_run_config(self.start, self.cfg, self.run_dir, self.state.step,
                               f"train.precision: {self.precision.reason}", self.log_fn)

    # -- validation and checkpoints ------------------------------------------------------------

    def validate(self) -> dict[str, float] | None:
        """Validation loss and BLEU on rank 0; updates best.pt and early stopping."""
        return self.validator(self.model, self.state)

    def maybe_save(self, force: bool = False) -> None:
        t = self.cfg.train
        if not force and self.state.step % t.save_every:
            return
        self._read_skips()
        rngs = D.gather_objects(rng_state(self.device), self.dist)  # every rank takes part
        if self.dist.is_main:
            state = training_state(self.optimizer, self.scheduler, self.scaler, self.batches.position_dict,
                                   asdict(self.state), rngs)
            save_last({**self._weights(), **state}, self.ckpt_dir, self.state.step, t.keep_last,
                      keep_steps={int(step) for _, step in self.state.top})

    def _weights(self) -> dict[str, Any]:
        return weights_state(self.cfg, self.data.tokenizer, self.model, self.state.step)


def first_sentence(batch: Batch) -> Batch:
    """The batch's first pair alone (a stand-in pass that only has to touch every parameter)."""
    tgt_out = batch.tgt_out[:1]
    positions = torch.nonzero(tgt_out.reshape(-1) != PAD_ID).squeeze(1)
    return Batch(batch.src[:1], batch.tgt_in[:1], tgt_out, positions, positions.numel(),
                 int((batch.src[:1] != PAD_ID).sum()), batch.src[:1].numel() + tgt_out.numel())


def _shapes(batches: list[Batch]) -> str:
    return "batch shapes " + ", ".join(f"src {tuple(b.src.shape)} tgt {tuple(b.tgt_out.shape)}" for b in batches)


def train(cfg: Config, log: Callable[[str], None] = print) -> TrainState:
    """Train (or resume) the run described by ``cfg``; the entry point of ``nmt train``."""
    run_dir = Path(cfg.run_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes the run's shared files
    check_writable(run_dir, is_main)
    lock = RunLock(run_dir) if is_main else contextlib.nullcontext()
    with lock:
        trainer = Trainer(cfg, log)
        try:
            return trainer.train()
        finally:
            trainer.batches.close()
            trainer.metrics.close()
            D.shutdown(trainer.dist)


