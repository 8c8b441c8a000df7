from __future__ import annotations

import ast
import os
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


def _nmt_imports() -> dict[str, set[str]]:
    """Module -> the nmt modules it imports anywhere (at the top or inside functions)."""
    package = ROOT / "src" / "nmt"
    graph = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nmt"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("nmt")}
        graph[name] = imported - {name}
    return graph


def test_no_module_imports_its_caller():
    graph = _nmt_imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
        return False

    cycles = [{a, b} for a in graph for b in graph[a] if a < b and reaches(b, a)]
    assert cycles == []


def test_the_server_takes_attention_maps_from_where_the_plots_do():
    graph = _nmt_imports()
    assert "nmt.attention_maps" in graph["nmt.serve"] and "nmt.attention_maps" in graph["nmt.attention_plot"]
    assert "nmt.attention_plot" not in graph["nmt.serve"] and "nmt.plot" not in graph["nmt.attention_maps"]


def test_the_model_and_the_search_load_without_sentencepiece():
    code = "import sys, nmt.model, nmt.decoding; assert 'sentencepiece' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert result.returncode == 0, result.stderr
