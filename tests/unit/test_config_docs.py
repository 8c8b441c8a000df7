"""docs/config.md is generated from nmt.config by scripts/config_docs.py and kept up to date."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from nmt.config import Config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "config_docs.py"
_spec = importlib.util.spec_from_file_location("config_docs", SCRIPT)
config_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_docs)


def test_docs_config_md_is_up_to_date():
    current = config_docs.DOC.read_text(encoding="utf-8") if config_docs.DOC.is_file() else ""
    assert current == config_docs.render(), (
        f"docs/config.md is out of date with src/nmt/config.py: run {config_docs.COMMAND}")


def test_every_config_field_is_documented_with_its_default():
    text = config_docs.render()
    for section in dataclasses.fields(Config):
        default = section.default_factory() if section.default is dataclasses.MISSING else section.default
        if not dataclasses.is_dataclass(default):
            continue
        docs = config_docs.field_docs(type(default))
        for f in dataclasses.fields(default):
            value = config_docs.yaml_value(getattr(default, f.name))
            doc = " ".join(docs[f.name].split()).replace("|", "\\|")
            row = next(line for line in text.splitlines() if line.startswith(f"| `{section.name}.{f.name}` |"))
            assert row.endswith(f"| `{value}` | {doc} |"), row


@dataclass
class _Section:
    """What this section is for."""

    mode: Literal["a", "b"] = "a"
    """Which | way."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Two
    lines."""
    path: str | None = None
    """Where."""


@dataclass
class _Root:
    name: str = ""
    """Run name."""
    part: _Section = field(default_factory=_Section)


def test_render_lists_types_defaults_and_docstrings():
    text = config_docs.render(_Root)
    assert "| `name` | `str` | `\"\"` | Run name. |" in text
    assert "## `part`\n\nWhat this section is for." in text
    assert "| `part.mode` | `Literal['a', 'b']` | `a` | Which \\| way. |" in text
    assert "| `part.betas` | `tuple[float, float]` | `[0.9, 0.98]` | Two lines. |" in text
    assert "| `part.path` | `str \\| None` | `null` | Where. |" in text


def test_a_field_without_a_docstring_is_an_error():
    @dataclass
    class Undocumented:
        lr: float = 0.1
        """Documented."""
        steps: int = 10

    with pytest.raises(ValueError, match="Undocumented.steps has no docstring"):
        config_docs.render(Undocumented)


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config_docs, "DOC", tmp_path / "config.md")
    monkeypatch.setattr(config_docs, "REPO", tmp_path)
    assert config_docs.main(["--check"]) == 1
    assert "out of date: run" in capsys.readouterr().err
    assert config_docs.main([]) == 0
    assert config_docs.main(["--check"]) == 0
