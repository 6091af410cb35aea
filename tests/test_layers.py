"""The house's rules, read from the code's own imports: no import circles, and no import
that runs back up a floor (``docs/design.md``, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "shard_tools", "training", "benchmarks")
# floors, bottom first: a module may import from its own floor's rooms and from floors below
FLOORS = [
    ["pipeline.errors", "pipeline.lifetime"],
    ["pipeline.format"],
    ["pipeline.io"],
    ["pipeline.loading"],
    ["pipeline.mixing"],
    ["pipeline"],  # the package's public names
    ["shard_tools.version", "shard_tools.hashing_file", "shard_tools.progress_bar", "shard_tools.staging"],
    ["shard_tools.writer"],
    ["shard_tools.formats"],
    ["shard_tools.conversion"],
    ["shard_tools.convert", "shard_tools.validate", "shard_tools.inspect", "shard_tools.write",
     "shard_tools.manifests"],
    ["shard_tools.cli", "shard_tools"],
    ["training"],
    ["benchmarks"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports (``from a.b import c`` counts ``a.b.c`` when that is a
    module, else ``a.b``), whether at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def floor(module: str) -> int:
    """The floor of the most specific room that holds ``module``."""
    best, level = -1, -1
    for index, rooms in enumerate(FLOORS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and len(room) > best:
                best, level = len(room), index
    if level < 0:
        raise AssertionError(f"{module}: on no floor of FLOORS; add it")
    return level


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    assert circles(graph()) == []


def test_no_import_runs_back_up() -> None:
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if floor(b) > floor(a)]
    assert upward == []


def test_nothing_imports_training_or_benchmarks_from_below() -> None:
    edges = graph()
    for name, targets in edges.items():
        if not name.startswith(("training", "benchmarks")):
            assert not {t for t in targets if t.startswith(("training", "benchmarks"))}, name


def test_loading_knows_nothing_of_mixing() -> None:
    edges = graph()
    assert not [f"{a} -> {b}" for a, targets in edges.items() if a.startswith("pipeline.loading")
                for b in targets if b.startswith("pipeline.mixing")]


def test_the_format_wing_does_no_io() -> None:
    """Bytes in, objects out: no fsspec, no files opened by URL."""
    for path in (ROOT / "pipeline" / "format").glob("*.py"):
        assert "fsspec" not in path.read_text(), path


@pytest.mark.parametrize(("edges", "expected"), [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_circle_finder_finds_circles(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert circles(edges) == expected


def test_the_floor_check_sees_an_upward_import() -> None:
    assert floor("pipeline.format.schema") < floor("pipeline.loading.loader") < floor("shard_tools.convert")
