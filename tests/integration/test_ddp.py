from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.integration.conftest import ROOT, nmt

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it


def free_port() -> int:
    """A port nobody listens on now: a fixed one collides with another run of these tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from nmt.config import load_config
    from nmt.train import Trainer
    cfg = load_config("configs/tiny.yaml", sys.argv[1:])
    trainer = Trainer(cfg, log=print)
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        moved = trainer.state.step
        print(f"RANKS_IN_SYNC={same} STEPS={moved}")
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("overrides", [["model.arch=encoder_decoder"], ["model.arch=decoder_only"],
                                       ["task=mlm", "model.arch=encoder_only", "data.lang=en"]],
                         ids=["encoder_decoder", "decoder_only", "mlm"])
def test_two_process_cpu_ddp_stays_in_sync(tmp_path, small_corpus, overrides):
    script = tmp_path / "ddp_check.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), f"run_dir={tmp_path / 'run'}", f"data.dir={small_corpus}", "train.max_steps=8",
           "train.valid_every=0", "train.log_every=4", "data.max_valid_sentences=4", "train.threads=1",
           *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANKS_IN_SYNC=True STEPS=8" in result.stdout, result.stdout[-2000:]
    assert "2 processes" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


# Hooks on rank 1 only: SIGTERM to itself (a stop request the ranks must agree on) before step
# STOP_AT, and an out-of-memory error in its forward at step OOM_AT.
HOOKED = textwrap.dedent("""
    import os, signal, sys, torch, torch.distributed as dist
    from nmt.config import load_config
    from nmt.train import Trainer, train
    stop_at, oom_at = int(os.environ["STOP_AT"]), int(os.environ["OOM_AT"])
    real_step, real_forward = Trainer.train_step, Trainer._forward
    def train_step(self, flags=()):
        if dist.get_rank() == 1 and self.state.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, flags)
    fired = []
    def forward(self, batch, grad_scale):
        if dist.get_rank() == 1 and self.state.step + 1 == oom_at and grad_scale is not None and not fired:
            fired.append(True)  # once: a skipped update is no step, so the next try has the same number
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, batch, grad_scale)
    Trainer.train_step, Trainer._forward = train_step, forward
    state = train(load_config("configs/tiny.yaml", sys.argv[1:]))
    print(f"RANK{os.environ['RANK']}_SKIPPED={state.skipped_steps} STEP={state.step}")
""")


def _torchrun(tmp_path, run_dir, corpus, stop_at=0, oom_at=0):
    script = tmp_path / "hooked.py"
    script.write_text(HOOKED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), f"run_dir={run_dir}", f"data.dir={corpus}", "train.max_steps=6", "train.log_every=1",
           "train.valid_every=0", "data.max_valid_sentences=4", "train.threads=1", "train.save_every=100"]
    env = {**os.environ, "STOP_AT": str(stop_at), "OOM_AT": str(oom_at)}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_survive_an_oom_on_one_rank_and_resume_exactly(tmp_path, small_corpus):
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = _torchrun(tmp_path, straight, small_corpus, oom_at=2)
    # both ranks skipped the same update, and nothing hung
    assert "RANK0_SKIPPED=1 STEP=6" in out and "RANK1_SKIPPED=1 STEP=6" in out, out[-2000:]
    assert "step 2: out of memory on another rank; update skipped" in out
    out = _torchrun(tmp_path, split, small_corpus, stop_at=3, oom_at=2)
    assert "stop requested" in out and "RANK0_SKIPPED=1 STEP=4" in out, out[-2000:]
    _torchrun(tmp_path, split, small_corpus)
    a, b = _losses(straight), _losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a == b  # bit for bit: the same batches, dropout masks and gradients on each rank
    wa = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert len(wb["rng"]["ranks"]) == 2 and not torch.equal(wb["rng"]["ranks"][0]["torch"],
                                                            wb["rng"]["ranks"][1]["torch"])
    # another world size cannot resume exactly: refused with what to do
    single = nmt("train", "-c", "configs/tiny.yaml", f"run_dir={split}", f"data.dir={small_corpus}",
                 "train.max_steps=8")
    assert single.returncode == 2 and single.stderr.count("\n") == 1, single.stderr
    assert "saved by 2 training processes" in single.stderr and "train.init_from" in single.stderr


def _run_cli_script(tmp_path, name: str, body: str, args: list[str], port: int, env: dict | None = None):
    """torchrun, 2 processes on gloo, of ``body`` followed by ``nmt train`` with ``args``."""
    script = tmp_path / name
    script.write_text(textwrap.dedent(body) + textwrap.dedent("""
        from nmt.cli import run
        sys.exit(run(["train", "-c", "configs/tiny.yaml", *sys.argv[1:]]))
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})})


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_ranks_that_start_from_different_points_refuse_to_train(tmp_path, small_corpus):
    # run_dir not shared: rank 0 finds a last.pt (of a 2-process run), rank 1 an empty folder.
    from nmt.config import load_config
    from nmt.train import train

    base = tmp_path / "run"
    train(load_config(ROOT / "configs/tiny.yaml", [f"run_dir={base}0", f"data.dir={small_corpus}", "train.max_steps=2",
                                                   "train.valid_every=0", "data.max_valid_sentences=4"]),
          log=lambda _m: None)
    last = base.with_name("run0") / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["rng"]["ranks"] *= 2
    torch.save(ckpt, last)
    result = _run_cli_script(tmp_path, "own_dirs.py", """
        import os, sys
        sys.argv.append(f"run_dir={sys.argv.pop(1)}{os.environ['RANK']}")
    """, [str(base), f"data.dir={small_corpus}", "train.max_steps=4", "train.valid_every=0",
          "data.max_valid_sentences=4", "train.threads=1"], port=29519)
    assert result.returncode != 0
    errors = _error_lines(result.stderr)
    assert errors and all("run_dir" in e and "not shared" in e and "rank 0: resumed at step 2" in e
                          and "rank 1: fresh" in e for e in errors), result.stderr[-3000:]


def test_out_of_memory_in_the_stand_in_pass_stops_every_rank_with_last_pt_intact(tmp_path, small_corpus):
    # rank 1 runs out of memory in its forward on the second and third attempted updates; on the
    # third, its stand-in pass runs out of memory too. On the second the failed forward's tensors
    # must already be freed when the stand-in pass runs.
    run = tmp_path / "run"
    result = _run_cli_script(tmp_path, "oom_twice.py", """
        import sys, weakref, torch, torch.distributed as dist
        from nmt.train import Trainer
        real = Trainer._forward
        seen, held = [], []
        def forward(self, batch, grad_scale):
            if dist.get_rank() != 1:
                return real(self, batch, grad_scale)
            if grad_scale is not None:
                seen.append(True)
                if len(seen) in (2, 3):
                    activations = torch.ones(1000)  # held by the traceback while it lives
                    held.append(weakref.ref(activations))
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            elif len(seen) == 2:
                print(f"FREED_BEFORE_STAND_IN={held[-1]() is None}", flush=True)
            elif len(seen) == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, stand-in pass)")
            return real(self, batch, grad_scale)
        Trainer._forward = forward
    """, [f"run_dir={run}", f"data.dir={small_corpus}", "train.max_steps=6", "train.valid_every=0",
          "train.save_every=1", "data.max_valid_sentences=4", "train.threads=1"], port=29520)
    assert result.returncode != 0
    assert "FREED_BEFORE_STAND_IN=True" in result.stdout, result.stdout[-2000:]
    errors = sorted(_error_lines(result.stderr))
    assert len(errors) == 2, result.stderr[-3000:]
    assert "rank 0: the gradient exchange at step 2 failed, most likely because another process stopped" in errors[0]
    assert "rank 1 ran out of memory again in the stand-in pass at step 2" in errors[1]
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
