"""``train.precision=auto``: the fastest precision that works on this machine, and the reason for it.

CUDA GPUs get bf16 where they support it and fp16 (with loss scaling) otherwise. A CPU gets bf16 only
when it has native bf16 instructions (AVX-512 BF16 or AMX) *and* a short probe of a real training step
shows bf16 faster than fp32: without them bf16 matmuls are emulated and far slower than fp32. Every
other case trains in fp32, which runs everywhere.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nmt.errors import NMTError

CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
MIN_SPEEDUP = 1.1
"""bf16 must beat fp32 by this factor in the probe: near parity, fp32's extra accuracy wins and a
noisy probe must not flip the choice from run to run."""

Probe = Callable[[], tuple[float, float]]  # () -> (seconds per step in fp32, in bf16)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """fp32, bf16 or fp16: what the run trains in."""
    reason: str
    """Why, for the log and the run's config.yaml."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is missing: other systems)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def choose_precision(device_type: str, *, cuda_bf16: bool = False, flags: frozenset[str] = frozenset(),
                     probe: Probe | None = None) -> PrecisionChoice:
    """The decision of ``auto`` for a fresh run; the hardware facts come in as arguments."""
    if device_type == "cuda":
        if cuda_bf16:
            return PrecisionChoice("bf16", "CUDA GPU with bf16 support")
        return PrecisionChoice("fp16", "CUDA GPU without bf16 support: fp16 with loss scaling")
    native = sorted(CPU_BF16_FLAGS & flags)
    if device_type != "cpu" or not native:
        return PrecisionChoice("fp32", "CPU without native bf16 (no avx512_bf16 or amx_bf16 flag)")
    have = " and ".join(native)
    if probe is None:
        return PrecisionChoice("fp32", f"CPU has {have} but no probe was run")
    try:
        fp32_s, bf16_s = probe()
    except (RuntimeError, NMTError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return PrecisionChoice("fp32", f"CPU has {have} but the bf16 probe failed: {first}")
    speedup = fp32_s / bf16_s
    timing = f"a training step took {bf16_s * 1e3:.0f} ms in bf16, {fp32_s * 1e3:.0f} ms in fp32 ({speedup:.2f}x)"
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"CPU has {have} and {timing}")
    return PrecisionChoice("fp32", f"CPU has {have} but {timing}; bf16 needs {MIN_SPEEDUP}x")


def runs_well(precision: str, device_type: str, *, cuda_bf16: bool = False,
              flags: frozenset[str] = frozenset()) -> bool:
    """Whether ``precision`` is native on this device (fp16 on a CPU and bf16 without support are not)."""
    if precision == "fp32":
        return True
    if device_type == "cuda":
        return precision == "fp16" or cuda_bf16
    return device_type == "cpu" and precision == "bf16" and bool(CPU_BF16_FLAGS & flags)


def resolve_precision(requested: str, device_type: str, *, previous: str | None = None, cuda_bf16: bool = False,
                      flags: frozenset[str] = frozenset(), probe: Probe | None = None) -> PrecisionChoice:
    """What a run trains in: ``requested`` unless it is ``auto``.

    ``previous`` is the precision stored in the checkpoint being resumed. ``auto`` keeps it wherever
    it runs well, so a resumed run does not change its numerics on a noisy probe; on a device where
    it does not (a GPU run resumed on a CPU), ``auto`` chooses afresh.
    """
    if requested != "auto":
        return PrecisionChoice(requested, "set in the config")
    if previous is not None and runs_well(previous, device_type, cuda_bf16=cuda_bf16, flags=flags):
        return PrecisionChoice(previous, "auto: kept from the checkpoint being resumed")
    choice = choose_precision(device_type, cuda_bf16=cuda_bf16, flags=flags, probe=probe)
    if previous is not None:
        return PrecisionChoice(choice.precision, f"auto: {choice.reason} (the checkpoint's {previous} "
                                                 "does not run natively here)")
    return PrecisionChoice(choice.precision, f"auto: {choice.reason}")


def cuda_supports_bf16(device: torch.device) -> bool:
    """Native bf16: compute capability 8.0 on (Ampere and later) or a ROCm GPU.

    Not ``torch.cuda.is_bf16_supported()``: by default it also says yes on older GPUs, which only
    emulate bf16, slowly; those train in fp16 with loss scaling.
    """
    if device.type != "cuda":
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def decode_precision(requested: str, device: torch.device) -> str:
    """What decoding (translate, evaluate, serve) computes in: ``requested`` unless it is ``auto``,
    which takes bf16 on a GPU with native bf16 and fp32 elsewhere. A CPU stays fp32: without native
    bf16 it is emulated and slower, and there is no probe per command as for training."""
    if requested != "auto":
        return requested
    return "bf16" if cuda_supports_bf16(device) else "fp32"


def training_step_probe(model: torch.nn.Module, step: Callable[[], None], rounds: int = 3) -> Probe:
    """A probe timing ``step`` (a forward and backward of ``model``) in fp32 and under bf16 autocast.

    The rounds alternate fp32 and bf16 after one warm-up each, and the fastest round of each is
    compared: other load on the machine only ever adds time, so the minimum is the estimate it
    disturbs least. The gradients and the RNG state are restored: the probe leaves no trace in the run.
    """
    def probe() -> tuple[float, float]:
        rng = torch.get_rng_state()
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        try:
            for i in range(rounds + 1):
                for name in times:
                    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16"
                           else contextlib.nullcontext())
                    start = time.perf_counter()
                    with ctx:
                        step()
                    if i:  # the first round warms up allocator and kernels
                        times[name].append(time.perf_counter() - start)
        finally:
            model.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
        return min(times["fp32"]), min(times["bf16"])

    return probe


def synthetic_step(model: torch.nn.Module, src_vocab: int, tgt_vocab: int, batch_tokens: int,
                   length: int = 32) -> Callable[[], None]:
    """Forward and backward of the training objective on a random batch of ``batch_tokens`` (at most
    1,024: enough rows for full-width matmuls, while the probe's 8 steps stay a few seconds on a CPU)."""
    from nmt.loss import Objective
    from nmt.mlm import MaskedLMObjective

    rows = max(1, min(batch_tokens, 1024) // length)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, src_vocab, (rows, length), generator=g)
    tgt = torch.randint(4, tgt_vocab, (rows, length + 1), generator=g)  # [B, T + 1]: BOS y1 .. yT
    positions = torch.arange(rows * length)  # every target position is a real token
    targets = tgt[:, 1:].reshape(-1)
    # the encoder-only model's objective takes the same arguments (positions then index src)
    objective = (MaskedLMObjective if hasattr(model, "masked_states") else Objective)(model, 0.1)

    def step() -> None:
        loss, _ = objective(src, tgt[:, :-1], positions, targets)
        loss.backward()

    return step
