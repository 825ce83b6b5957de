"""The docs work: every `lite-rlhf` command line in README.md and docs/*.md resolves (`--dry-run`, or `--help`),
every `section.key` they name is a real config key, every relative link (and `#anchor`) resolves, and
docs/configuration.md is what scripts/config_reference.py makes of lite_rlhf/config.py now.

Command lines are taken from code blocks and from inline code. A synopsis is made runnable, never skipped:
`[...]` optional parts are given (`[k=v ...]` dropped), `a|b` alternatives run one by one (in step, so
`train-rm|train-pm ... <reward|preference>.lr` gives two lines), the placeholders N and LR get a number, and a
config file that does not exist (`my.yaml`, `config.yaml`) is a small temporary one. A torchrun line is
checked through its `-m lite_rlhf` part. `doctor` has no --dry-run: it and a bare `lite-rlhf` run `--help`.
Skipped: none.
"""

import contextlib
import dataclasses
import importlib.util
import io
import re
import shlex
import signal
from pathlib import Path

import pytest

from lite_rlhf import config
from lite_rlhf.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
PLACEHOLDERS = {"N": "2", "LR": "1e-3"}  # typed values; other placeholders (F, D, A, ...) are valid strings
NOT_KEYS = {"dpo.bta"}  # the misspelt key of the one-line error example in docs/commands.md


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def lineno(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def is_command(line: str) -> bool:
    words = line.split()
    return bool(words) and (
        words[0].rsplit("/", 1)[-1] == "lite-rlhf" or ("-m" in words and "lite_rlhf" in words[words.index("-m") :])
    )


def command_lines(page: Path) -> list[tuple[str, str]]:
    """(where, line) for every lite-rlhf command line of a page: in code blocks and in inline code."""
    text = page.read_text(encoding="utf-8")
    found = []
    for block in FENCE.finditer(text):
        first = lineno(text, block.start())
        for i, line in enumerate(block.group().replace("\\\n", " ").splitlines()):
            for part in re.split(r"\s#", line)[0].split("&&"):
                if is_command(part.strip()):
                    found.append((f"{rel(page)}:{first + i}", part.strip()))
    prose = FENCE.sub(lambda m: "\n" * m.group().count("\n"), text)
    for span in re.finditer(r"`([^`]+)`", prose):
        line = " ".join(span.group(1).split())
        if is_command(line):
            found.append((f"{rel(page)}:{lineno(prose, span.start())}", line))
    return found


def argvs(line: str, yaml_file: Path) -> list[list[str]]:
    """The argument lists of `main` that a documented command line stands for (see the module docstring)."""
    line = re.sub(r"\s*\[k=v \.\.\.\]", "", line)
    line = re.sub(r"\[([^\[\]]*)\]", r"\1", line)
    words = shlex.split(line)
    words = words[words.index("-m") + 2 :] if "-m" in words else words[1:]
    choices = max([w.count("|") + 1 for w in words] or [1])
    out = []
    for c in range(choices):
        argv = []
        for w in words:
            w = re.sub(r"<([^<>|]*\|[^<>]*)>", lambda m, c=c: m.group(1).split("|")[c], w)  # <a|b>.lr
            if "|" in w:
                w = w.split("|")[c]
            key, eq, value = w.rpartition("=")
            w = f"{key}={PLACEHOLDERS[value]}" if eq and value in PLACEHOLDERS else PLACEHOLDERS.get(w, w)
            if w.endswith((".yaml", ".yml")) and "=" not in w and not (ROOT / w).is_file():
                w = str(yaml_file)
            argv.append(w)
        out.append(argv)
    return out


def cli(argv: list[str]) -> tuple[int, str]:
    """`lite-rlhf ARGV` in this process, its output captured; the SIGTERM handler it installs is put back."""
    handler = signal.getsignal(signal.SIGTERM)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main(argv)
    except SystemExit as stop:  # argparse: --help, or a usage error
        rc = stop.code or 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    return rc, buf.getvalue()


COMMANDS = [(where, line) for page in PAGES for where, line in command_lines(page)]


def test_the_docs_hold_commands():
    pages = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "docs/commands.md", "docs/gpus.md", "docs/performance.md"} <= pages, pages


@pytest.mark.parametrize("where, line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs(where, line, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the project root
    yaml_file = tmp_path / "my.yaml"
    yaml_file.write_text("run:\n  out_dir: runs/docs-check\n")
    for argv in argvs(line, yaml_file):
        flag = "--help" if not argv or argv[0] in ("doctor", "--help") else "--dry-run"
        rc, out = cli([*argv, flag])
        assert rc == 0, f"{where}: `{line}` -> lite-rlhf {' '.join([*argv, flag])} exited {rc}:\n{out[-2000:]}"


# --------------------------------------------------------------------------- config keys

SECTIONS = {f.name for f in dataclasses.fields(config.Config)}
KEYS = set(config._all_keys())
KEY = re.compile(rf"(?<![\w./-])({'|'.join(sorted(SECTIONS))})\.([A-Za-z_]\w*)")
FILE_ENDINGS = {"py", "json", "jsonl", "md", "yaml", "yml", "csv", "parquet", "safetensors", "txt", "sh"}


def named_keys(page: Path) -> list[tuple[int, str]]:
    text = page.read_text(encoding="utf-8")
    return [(lineno(text, m.start()), m.group()) for m in KEY.finditer(text) if m.group(2) not in FILE_ENDINGS]


def test_named_keys_are_real():
    bad = [f"{rel(p)}:{n}: {key}" for p in PAGES for n, key in named_keys(p) if key not in KEYS | NOT_KEYS]
    assert not bad, "not config keys:\n" + "\n".join(bad)
    assert len({k for p in PAGES for _, k in named_keys(p)}) > 50  # the pattern finds what it should


# --------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        base = slug(m.group(1))
        out.add(f"{base}-{seen[base]}" if seen.get(base) else base)
        seen[base] = seen.get(base, 0) + 1
    return out


def test_relative_links_resolve():
    bad, count = [], 0
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            count += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{rel(page)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{rel(page)}: {target}: no heading '#{anchor}' in {dest.name}")
    assert not bad, "\n".join(bad)
    assert count > 20


def test_slugs_follow_github():
    assert slug("One copy of the base weights: the engine's are the trainer's") == (
        "one-copy-of-the-base-weights-the-engines-are-the-trainers"
    )
    assert slug("`lite-rlhf plan`") == "lite-rlhf-plan"


# --------------------------------------------------------------------------- the configuration reference


def test_configuration_page_is_generated_from_config_py():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == module.render(), (
        "docs/configuration.md is stale: run .venv/bin/python scripts/config_reference.py --write"
    )
    for key in KEYS:
        assert f"`{key}`" in page.read_text(encoding="utf-8"), key
