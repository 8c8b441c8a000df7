from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nmt.checkpoint import (
    average_checkpoints,
    check_task,
    load_checkpoint,
    load_for_inference,
    prune_step_checkpoints,
    save_checkpoint,
    step_checkpoints,
)
from nmt.config import load_config, to_dict
from nmt.errors import NMTError


def _state(value: float) -> dict:
    return {"config": {}, "step": 3, "model": {"w": torch.full((2, 2), value), "n": torch.tensor(7)}}


def test_save_and_load_round_trip(tmp_path):
    save_checkpoint(_state(1.5), tmp_path / "a.pt")
    state = load_checkpoint(tmp_path / "a.pt")
    assert state["format_version"] == 1 and state["step"] == 3
    assert torch.equal(state["model"]["w"], torch.full((2, 2), 1.5))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp files left


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": {}, "x": _Payload(marker)}, path)
    with pytest.raises(NMTError, match="refusing.*GLOBAL posix.system"):
        load_checkpoint(path)
    assert not marker.exists()
    # The payload is real: plain pickle loading would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", os.urandom(2048), b"PK\x03\x04truncated"])
def test_truncated_or_random_files_give_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(NMTError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_truncated_real_checkpoint(tmp_path):
    save_checkpoint(_state(1.0), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(NMTError):
        load_checkpoint(tmp_path / "a.pt")


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1.0), path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((2, 2), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow  # starts and kills processes
def test_sigkill_during_saving_never_leaves_an_unreadable_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000, 1000)}}, path)
    script = textwrap.dedent(f"""
        import torch
        from nmt.checkpoint import save_checkpoint
        i = 0
        while True:
            i += 1
            save_checkpoint({{"model": {{"w": torch.full((1000, 1000), float(i))}}}}, {str(path)!r})
    """)
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script])
        try:
            proc.wait(timeout=delay + 1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        w = load_checkpoint(path)["model"]["w"]
        assert torch.all(w == w[0, 0])


def test_average_and_step_checkpoint_pruning(tmp_path):
    for step, value in [(10, 1.0), (20, 2.0), (30, 6.0)]:
        save_checkpoint(_state(value), tmp_path / f"checkpoint_{step}.pt")
    paths = step_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["checkpoint_10.pt", "checkpoint_20.pt", "checkpoint_30.pt"]
    avg = average_checkpoints(paths)
    assert torch.allclose(avg["model"]["w"], torch.full((2, 2), 3.0))
    assert avg["model"]["w"].dtype == torch.float32 and avg["model"]["n"].item() == 7
    prune_step_checkpoints(tmp_path, keep=1)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint_30.pt"]


def test_average_refuses_mismatched_shapes(tmp_path):
    save_checkpoint(_state(1.0), tmp_path / "a.pt")
    save_checkpoint({"model": {"w": torch.zeros(3), "n": torch.tensor(1)}}, tmp_path / "b.pt")
    with pytest.raises(NMTError, match="shape"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])


def test_missing_checkpoint():
    with pytest.raises(NMTError, match="not found"):
        load_checkpoint("/nonexistent/x.pt")


def test_many_random_files_all_give_a_clear_error(tmp_path):
    # Random bytes reach torch's unpickler as KeyError, IndexError and others, not only UnpicklingError.
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "bad.pt"
    for _ in range(300):
        path.write_bytes(bytes(torch.randint(0, 256, (512,), generator=gen, dtype=torch.uint8).tolist()))
        with pytest.raises(NMTError, match="not a readable checkpoint"):
            load_checkpoint(path)


def test_save_last_keeps_step_copies_of_the_same_bytes_and_prunes(tmp_path):
    from nmt.checkpoint import save_last

    for step in (1, 2, 3):
        save_last({"step": step, "model": {"w": torch.full((2,), float(step))}}, tmp_path, step, keep_last=2)
    assert {p.name for p in tmp_path.iterdir()} == {"last.pt", "checkpoint_2.pt", "checkpoint_3.pt"}
    assert (tmp_path / "checkpoint_3.pt").read_bytes() == (tmp_path / "last.pt").read_bytes()
    save_last({"step": 4}, tmp_path, 4, keep_last=0)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4 and not (tmp_path / "checkpoint_4.pt").exists()


def test_training_checkpoint_holds_what_an_exact_resume_needs():
    from nmt.checkpoint import training_state

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = training_state(opt, sched, torch.amp.GradScaler("cpu", enabled=False), {"epoch": 3, "position": 7},
                           {"step": 5}, [{"torch": torch.get_rng_state()}])
    assert state["epoch"] == 3 and state["train_state"] == {"step": 5} and len(state["rng"]["ranks"]) == 1
    assert {"optimizer", "scheduler", "scaler", "sampler"} <= state.keys()


def _adam(kind: str, model: torch.nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=0.1, **{kind: True})


@pytest.mark.parametrize("saved, loaded", [("foreach", "fused"), ("fused", "foreach")])
def test_optimizer_state_keeps_this_runs_kernels(saved, loaded):
    # A CPU run saves foreach Adam; resumed on a GPU, the optimizer is fused (and the reverse).
    from nmt.checkpoint import load_optimizer_state
    from nmt.optim import uses_fused

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    before = _adam(saved, model)
    model(torch.randn(4, 3)).sum().backward()
    before.step()
    after = _adam(loaded, model)
    load_optimizer_state(after, before.state_dict(), "last.pt")
    assert uses_fused(after) == (loaded == "fused")
    assert all(bool(g.get(loaded)) and not g.get(saved) for g in after.param_groups)
    assert after.param_groups[0]["lr"] == 0.1 and after.state  # the saved state itself is loaded
    weights = [p.detach().clone() for p in model.parameters()]
    if uses_fused(after):  # the training step hands fused Adam its skip decision on the device
        after.grad_scale, after.found_inf = None, torch.ones(())
    after.step()
    assert all(torch.equal(w, p) != (loaded == "foreach") for w, p in zip(weights, model.parameters(), strict=True))


def test_pruning_spares_the_kept_steps_and_keep_last_zero_still_saves_them(tmp_path):
    from nmt.checkpoint import save_last

    for step in (1, 2, 3, 4):
        save_last({"step": step}, tmp_path, step, keep_last=1, keep_steps={2})
    assert {p.name for p in tmp_path.glob("checkpoint_*")} == {"checkpoint_2.pt", "checkpoint_4.pt"}
    save_last({"step": 5}, tmp_path, 5, keep_last=0, keep_steps={2, 5})
    assert {p.name for p in tmp_path.glob("checkpoint_*")} == {"checkpoint_2.pt", "checkpoint_5.pt"}


@pytest.mark.parametrize(("overrides", "wanted", "command"), [
    (["task=lm", "model.arch=decoder_only", "data.lang=de"], "translation", "nmt generate"),
    (["task=mlm", "model.arch=encoder_only", "data.lang=en"], "translation", "nmt fill-mask"),
    ([], "lm", "nmt translate"),
])
def test_a_checkpoint_of_another_task_names_the_command_that_fits(tmp_path, overrides, wanted, command):
    cfg = load_config(None, overrides)
    save_checkpoint({"config": to_dict(cfg), "tokenizer": {}, "model": {}, "step": 1}, tmp_path / "m.pt")
    with pytest.raises(NMTError, match=f"is a task={cfg.task} model and this command needs task={wanted}: use {command}$"):
        load_for_inference(tmp_path / "m.pt", task=wanted)
    check_task(cfg, "x", cfg.task)  # its own task passes
