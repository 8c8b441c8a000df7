from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nmt

ROOT = Path(__file__).resolve().parents[2]


def test_the_torch_minimum_admits_current_releases_and_matches_pyproject():
    assert not nmt._torch_too_old("2.11.0") and not nmt._torch_too_old("2.4.0a0+git123")
    assert nmt._torch_too_old("2.3.1") and nmt._torch_too_old("1.13.1+cu117")
    pin = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert tuple(int(x) for x in pin.split(".")) == nmt.TORCH_MINIMUM


def test_a_too_old_torch_fails_at_import_with_one_line(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "2.3.1"\n')
    meta = tmp_path / "torch-2.3.1.dist-info"  # the check reads the version from here
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.3.1\n")
    result = subprocess.run([sys.executable, "-c", "import nmt.cli"], capture_output=True, text=True,
                            env={"PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}"}, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "error: nmt needs torch >= 2.4, found 2.3.1: pip install 'torch>=2.4'\n"
