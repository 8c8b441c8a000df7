"""Write docs/config.md, the reference of every config field, from the dataclasses in nmt.config.

Usage (from the repository root)::

    PYTHONPATH=src .venv/bin/python scripts/config_docs.py           # regenerate docs/config.md
    PYTHONPATH=src .venv/bin/python scripts/config_docs.py --check   # exit 1 if it is out of date

Each field's type is its annotation as written in config.py, its default the value a YAML file
would spell, and its description the docstring right under the field. A field without a
docstring is an error: config.py is the one place where defaults are documented.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "config.md"
COMMAND = "PYTHONPATH=src .venv/bin/python scripts/config_docs.py"

HEADER = f"""# Configuration reference

<!-- Generated from src/nmt/config.py by scripts/config_docs.py; do not edit by hand.
     Regenerate with: {COMMAND} -->

A run is configured by a YAML file (see `configs/`) and `key.sub=value` overrides on the command
line, e.g. `nmt train -c configs/multi30k_en_de.yaml train.lr=5e-4 model.dropout=0.3`. Both only
replace the defaults below; unknown keys and values of the wrong type are rejected with the valid
choices named. `null` is YAML's None.
"""


def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring under it} from the source of dataclass ``cls``."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, after in zip(body.body, body.body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def yaml_value(value: Any) -> str:
    """A default as it would be written in a YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"field {f.name} has no default")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(cls: type, fields: list[dataclasses.Field], prefix: str) -> list[str]:
    docs = field_docs(cls)
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for f in fields:
        if f.name not in docs:
            raise ValueError(f"{cls.__name__}.{f.name} has no docstring (a string right under the field)")
        key, default = f"{prefix}{f.name}", yaml_value(_default(f))
        lines.append(f"| `{key}` | `{_cell(str(f.type))}` | `{_cell(default)}` | {_cell(docs[f.name])} |")
    return lines


def render(root: type | None = None) -> str:
    """The whole of docs/config.md for ``root`` (default ``nmt.config.Config``): its own fields,
    then one section per dataclass-valued field."""
    if root is None:
        from nmt.config import Config
        root = Config
    fields = dataclasses.fields(root)
    sections = [f for f in fields if dataclasses.is_dataclass(_default(f))]
    leaves = [f for f in fields if f not in sections]
    out = [HEADER]
    if leaves:
        out += ["## Top level", "", *_table(root, leaves, ""), ""]
    for f in sections:
        cls = type(_default(f))
        out += [f"## `{f.name}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # not dataclass's own
            out += [inspect.cleandoc(cls.__doc__), ""]
        out += [*_table(cls, dataclasses.fields(cls), f"{f.name}."), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC.relative_to(REPO)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
