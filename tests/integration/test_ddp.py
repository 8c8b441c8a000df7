from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.integration.conftest import ROOT, nmt

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


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_two_process_cpu_ddp_stays_in_sync(tmp_path, small_corpus, arch):
    script = tmp_path / "ddp_check.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(script), f"run_dir={tmp_path / 'run'}", f"data.dir={small_corpus}", "train.max_steps=8",
           "train.valid_every=0", "train.log_every=4", "data.max_valid_sentences=4", "train.threads=1",
           f"model.arch={arch}"]
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
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
