from __future__ import annotations

import pytest
import torch

from nmt.config import ModelConfig
from nmt.errors import NMTError
from nmt.precision import (
    MIN_SPEEDUP,
    choose_precision,
    cpu_flags,
    cuda_supports_bf16,
    resolve_precision,
    synthetic_step,
    training_step_probe,
)

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX2 = frozenset({"avx2", "fma"})


def timings(fp32: float, bf16: float):
    calls = []

    def probe():
        calls.append(1)
        return fp32, bf16

    return probe, calls


def test_cuda_takes_bf16_where_supported_and_fp16_with_loss_scaling_elsewhere():
    assert choose_precision("cuda", cuda_bf16=True).precision == "bf16"
    old = choose_precision("cuda", cuda_bf16=False)
    assert old.precision == "fp16" and "loss scaling" in old.reason


def test_cpu_without_native_bf16_trains_fp32_and_never_probes():
    probe, calls = timings(2.0, 1.0)
    choice = choose_precision("cpu", flags=AVX2, probe=probe)
    assert choice.precision == "fp32" and "no avx512_bf16 or amx_bf16" in choice.reason and not calls


@pytest.mark.parametrize("flags", [AMX, frozenset({"avx512_bf16"}), frozenset({"amx_bf16"})])
def test_cpu_with_native_bf16_takes_it_when_the_probe_finds_it_faster(flags):
    probe, calls = timings(fp32=0.163, bf16=0.100)
    choice = choose_precision("cpu", flags=flags, probe=probe)
    assert choice.precision == "bf16" and calls == [1]
    assert "100 ms in bf16, 163 ms in fp32 (1.63x)" in choice.reason


@pytest.mark.parametrize("fp32, bf16", [(0.100, 0.100), (0.105, 0.100), (0.100, 2.6)])
def test_cpu_with_native_bf16_stays_fp32_when_the_probe_finds_no_clear_gain(fp32, bf16):
    assert fp32 / bf16 < MIN_SPEEDUP
    choice = choose_precision("cpu", flags=AMX, probe=timings(fp32, bf16)[0])
    assert choice.precision == "fp32" and f"bf16 needs {MIN_SPEEDUP}x" in choice.reason


def test_a_failing_probe_means_fp32():
    def broken():
        raise RuntimeError("oneDNN: unsupported\nmore")

    choice = choose_precision("cpu", flags=AMX, probe=broken)
    assert choice.precision == "fp32" and choice.reason.endswith("probe failed: oneDNN: unsupported")


def test_explicit_precision_is_kept_and_auto_says_why():
    assert resolve_precision("bf16", "cpu", flags=AVX2) == resolve_precision("bf16", "cpu")
    assert resolve_precision("fp16", "cpu").precision == "fp16"
    auto = resolve_precision("auto", "cuda", cuda_bf16=True)
    assert auto.precision == "bf16" and auto.reason.startswith("auto: ")


def test_resumed_auto_run_keeps_its_checkpoint_precision_where_it_runs_natively():
    probe, calls = timings(fp32=1.0, bf16=2.0)  # a probe now would say fp32
    kept = resolve_precision("auto", "cpu", previous="bf16", flags=AMX, probe=probe)
    assert kept.precision == "bf16" and "kept from the checkpoint" in kept.reason and not calls
    assert resolve_precision("auto", "cuda", previous="fp16", cuda_bf16=True).precision == "fp16"
    # moved to a machine where the stored choice is not native: chosen afresh
    moved = resolve_precision("auto", "cpu", previous="bf16", flags=AVX2)
    assert moved.precision == "fp32" and "checkpoint's bf16 does not run natively" in moved.reason
    assert resolve_precision("auto", "cpu", previous="fp16", flags=AMX, probe=timings(1.0, 2.0)[0]).precision == "fp32"
    assert resolve_precision("auto", "cuda", previous="bf16", cuda_bf16=False).precision == "fp16"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_probe_times_both_precisions_and_leaves_no_trace(one_torch_thread):
    from nmt.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_layers=1, decoder_layers=1, d_model=32, heads=2, d_ff=64), 50, 50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seen = []
    step = synthetic_step(model, 50, 50, batch_tokens=256)

    def recording_step():
        seen.append(torch.is_autocast_enabled("cpu"))
        step()

    fp32_s, bf16_s = training_step_probe(model, recording_step, rounds=2)()
    assert fp32_s > 0 and bf16_s > 0
    assert seen == [False, True] * 3  # a warm-up round, then alternating rounds
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_probe_errors_other_than_runtime_ones_propagate():
    def bug():
        raise TypeError("a bug, not a hardware limit")

    with pytest.raises(TypeError):
        choose_precision("cpu", flags=AMX, probe=bug)
    assert choose_precision("cpu", flags=AMX, probe=lambda: (_ for _ in ()).throw(NMTError("x"))).precision == "fp32"


@pytest.mark.parametrize("major, hip, native", [(7, None, False), (8, None, True), (9, None, True), (7, "6.0", True)])
def test_cuda_bf16_means_native_support_not_emulation(monkeypatch, major, hip, native):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    assert cuda_supports_bf16(torch.device("cuda", 0)) is native
    assert cuda_supports_bf16(torch.device("cpu")) is False


def _fake_gpu(monkeypatch, major: int) -> torch.device:
    """A CUDA device of compute capability ``major``.x as far as the precision choice can tell."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(major=major))
    return torch.device("cuda", 0)


@pytest.mark.parametrize("major, expected", [(8, "bf16"), (9, "bf16"), (7, "fp32")])
def test_decoding_auto_takes_bf16_on_gpus_that_have_it(monkeypatch, major, expected):
    from nmt.precision import decode_precision

    device = _fake_gpu(monkeypatch, major)
    assert decode_precision("auto", device) == expected
    assert decode_precision("fp32", device) == "fp32" and decode_precision("fp16", device) == "fp16"


def test_decoding_auto_is_fp32_on_the_cpu_even_with_native_bf16(monkeypatch):
    from nmt.precision import decode_precision

    monkeypatch.setattr("nmt.precision.cpu_flags", lambda *a: AMX)
    assert decode_precision("auto", torch.device("cpu")) == "fp32"
    assert decode_precision("bf16", torch.device("cpu")) == "bf16"
