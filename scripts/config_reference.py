"""Write docs/configuration.md from lite_rlhf/config.py: every section and key with its type, default, allowed
range and the comment written beside or above it in the source (one source of truth; tests/test_docs.py checks
that the page is up to date).

    .venv/bin/python scripts/config_reference.py > docs/configuration.md
    .venv/bin/python scripts/config_reference.py --write
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

from lite_rlhf import config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from `lite_rlhf/config.py` by `scripts/config_reference.py`: do not edit by hand. After changing a
key, regenerate it with `.venv/bin/python scripts/config_reference.py --write` (or
`.venv/bin/python scripts/config_reference.py > docs/configuration.md`); `tests/test_docs.py` fails while
this page and the dataclasses disagree.

Set a key in a YAML file (`section:` then `key: value`) or on the command line as `section.key=value`;
precedence and errors are in [commands.md](commands.md#configs). A range is the one the config loader checks:
`[` and `]` include the end, `(` and `)` exclude it.
"""


def _comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines just above the field and the comment on its own lines, joined."""
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip():
            trailing[tok.start[0]] = tok.string.lstrip("#").strip().removesuffix("fmt: skip").strip()
    out = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, n = [], node.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, lines[n - 1].strip().lstrip("#").strip())
                n -= 1
            beside = [trailing[i] for i in range(node.lineno, node.end_lineno + 1) if trailing.get(i)]
            out[cls.name, node.target.id] = " ".join(above + beside)
    return out


def _default(f: dataclasses.Field) -> str:
    value = f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def _range(meta: typing.Mapping) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return ""
    left = "(" if lo is None or meta.get("lo_open") else "["
    right = ")" if hi is None or meta.get("hi_open") else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    notes = _comments(inspect.getsource(config))
    parts = [HEADER.rstrip("\n")]
    for section, cls in config._sections().items():
        parts.append(f"\n## `{section}`\n")
        docs = [k.__dict__.get("__doc__") or "" for k in (cls, config.TrainerConfig) if issubclass(cls, k)]
        docs = [" ".join(d.split()) for d in docs if d and not d.startswith(cls.__name__ + "(")]
        if docs:
            parts.append(" ".join(dict.fromkeys(docs)) + "\n")
        parts.append("| key | type | default | range | what it does |\n|---|---|---|---|---|")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            note = next((notes[k.__name__, f.name] for k in cls.__mro__ if (k.__name__, f.name) in notes), "")
            row = [f"`{section}.{f.name}`", config._type_name(hints[f.name]), f"`{_default(f)}`", _range(f.metadata)]
            parts.append("| " + " | ".join(_cell(c) for c in [*row, note]) + " |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--write"]:
        PAGE.parent.mkdir(exist_ok=True)
        PAGE.write_text(text, encoding="utf-8")
        print(f"wrote {PAGE}")
    elif sys.argv[1:]:
        sys.exit("usage: config_reference.py [--write]")
    else:
        sys.stdout.write(text)
