"""The package's shape, kept: no import circle between harness modules, no harness import
made inside a function (each one used to hide a circle), only absolute imports (the cache
key's walk of a stage's sources, harness.plan.keys.stage_sources, follows those), and no
module past 400 lines. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "harness"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(HARNESS.rglob("*.py")):
        parts = path.relative_to(HARNESS.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def owner(name: str) -> str | None:
    """The harness module an imported name lives in (a name may be a module's attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def harness_imports(path: Path) -> list[tuple[ast.stmt, list[str], bool]]:
    """Each import statement naming harness modules: the modules, and whether it sits
    inside a function."""
    tree = ast.parse(path.read_text())
    inside = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        targets = sorted(
            {m for n in names if n.split(".")[0] == "harness" for m in [owner(n)] if m}
        )
        if targets:
            found.append((node, targets, id(node) in inside))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for _, targets, _ in harness_imports(path):
            edges.setdefault(name, set()).update(t for t in targets if t != name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), less a package face
    importing its own submodules, which is how a face works and no circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted({*edges, *(w for ws in edges.values() for w in ws)}):
        if v not in index:
            visit(v)
    return [g for g in found if not all(m == g[0] or m.startswith(g[0] + ".") for m in g)]


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_circle_finder_finds_one():
    edges = {"harness.a": {"harness.b"}, "harness.b": {"harness.c"}, "harness.c": {"harness.a"}}
    assert circles(edges) == [["harness.a", "harness.b", "harness.c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_harness_imports_sit_at_the_top_and_are_absolute(name):
    path = MODULES[name]
    inner = [node.lineno for node, _, inside in harness_imports(path) if inside]
    assert not inner, f"{path}:{inner[0]}: harness import inside a function; move it to the top"
    relative = [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative, f"{path}:{relative[0]}: relative import; write it absolute"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_short(name):
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name]}: {lines} lines; split it along a seam"
