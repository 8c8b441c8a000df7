"""The Makefile's choice of recipe: the GPU one where an NVIDIA driver lists a GPU, the CPU one elsewhere."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT


@pytest.mark.parametrize("lists_a_gpu, config", [(True, "configs/multi30k_en_de_gpu.yaml"),
                                                  (False, "configs/multi30k_en_de.yaml"),
                                                  (None, "configs/multi30k_en_de.yaml")])
def test_make_train_runs_the_recipe_for_the_machine(tmp_path, lists_a_gpu, config):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if lists_a_gpu is not None:  # an nvidia-smi that lists a GPU, or one whose driver is not loaded
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n" if lists_a_gpu else "#!/bin/sh\nexit 9\n")
        smi.chmod(0o755)
    path = ":".join([str(bin_dir), *(p for p in os.environ["PATH"].split(":")
                                     if not (Path(p) / "nvidia-smi").exists())])
    result = subprocess.run(["make", "-n", "train", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PATH": path})
    recipe = [line for line in result.stdout.splitlines() if "reproduce_multi30k.sh" in line]
    assert len(recipe) == 1 and f" {config}" in recipe[0], result.stdout
