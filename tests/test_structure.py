"""The shape of the code: no import cycles inside the package (function-local imports included), short
functions in the loop and the stage mechanism, and a stated reason for any long function elsewhere."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = {"lite_rlhf": ROOT / "lite_rlhf", "lite_rlhf.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGE.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([name, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every lite_rlhf module `name` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def graph() -> dict[str, set[str]]:
    mods = modules()
    # a package's __init__ is imported with any of its modules: it is not an edge of its own
    return {n: {m for m in imports(n, p, set(mods)) if not n.startswith(m + ".")} for n, p in mods.items()}


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    g = graph()
    g["lite_rlhf.config"].add("lite_rlhf.loop")  # config importing loop would close a cycle
    assert find_cycle(g) is not None


def test_nothing_imports_the_loop_or_the_cli():
    for name, deps in graph().items():
        if name not in ("lite_rlhf.cli", "lite_rlhf.__main__"):  # `python -m lite_rlhf` is the cli
            assert "lite_rlhf.loop" not in deps and "lite_rlhf.cli" not in deps, name


def functions(path: Path):
    source = path.read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(source))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = source[node.lineno - 1 : node.end_lineno]
            yield node.name, len(body), any("# Long:" in line for line in body)


@pytest.mark.parametrize("name", ["loop.py", "runstate.py"])
def test_loop_and_stage_mechanism_functions_are_short(name):
    long = [(f, n) for f, n, _ in functions(ROOT / "lite_rlhf" / name) if n > 60]
    assert not long, long


def test_long_functions_say_why():
    unexplained = [(str(p.relative_to(ROOT)), f, n) for p in modules().values() for f, n, why in functions(p)
                   if n > 80 and not why]  # fmt: skip
    assert not unexplained, unexplained
