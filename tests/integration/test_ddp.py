from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.integration.conftest import ROOT

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


def test_two_process_cpu_ddp_stays_in_sync(tmp_path, small_corpus):
    script = tmp_path / "ddp_check.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(script), f"run_dir={tmp_path / 'run'}", f"data.dir={small_corpus}", "train.max_steps=8",
           "train.valid_every=0", "train.log_every=4", "data.max_valid_sentences=4", "train.threads=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANKS_IN_SYNC=True STEPS=8" in result.stdout, result.stdout[-2000:]
    assert "2 processes" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
