"""The package's layering, read from the source (every import, module-level or inside a function):

    config, storage  <  model, data, serve  <  train  <  post, eval, ablate  <  recipes, cli

`train/` is generic (it imports nothing above it), no two modules import each other through any chain, and no
module takes a private name from another package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "raysmol"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, list[str], int]]]:
    """module -> [(imported module, names taken from it, line)] for every raysmol import in it."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    out: dict[str, list[tuple[str, list[str], int]]] = {}
    for name, path in modules.items():
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("raysmol")]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raysmol"):
                names = [a.name for a in node.names]
                # `from raysmol.x import y` where y is a submodule imports that module
                subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in modules]
                found.append((node.module, [n for n in names if f"{node.module}.{n}" not in modules], node.lineno))
                found += [(s, [], node.lineno) for s in subs]
        out[name] = found
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (ROOT / parts[-1]).is_dir() else module


def test_train_imports_nothing_above_it():
    bad = [f"{m}:{line} imports {target}" for m, imps in _imports().items() if m.startswith("raysmol.train")
           for target, _, line in imps if target.startswith(("raysmol.post", "raysmol.eval", "raysmol.ablate",
                                                             "raysmol.recipes", "raysmol.cli"))]
    assert not bad, bad


@pytest.mark.parametrize("lower", ["raysmol.config", "raysmol.storage", "raysmol.model", "raysmol.data",
                                   "raysmol.serve"])
def test_lower_layers_import_no_training_or_recipes(lower):
    above = ("raysmol.train", "raysmol.post", "raysmol.eval", "raysmol.ablate", "raysmol.recipes", "raysmol.cli")
    bad = [f"{m}:{line} imports {target}" for m, imps in _imports().items() if m.startswith(lower)
           for target, _, line in imps if target.startswith(above)]
    assert not bad, bad


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in imps if t != m} for m, imps in _imports().items()}
    # A package's __init__ is imported with any of its modules: count those edges too.
    for m in list(graph):
        parent = m.rsplit(".", 1)[0]
        if parent in graph and parent != m:
            graph[m].add(parent)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # raysmol/__init__ <- raysmol.x is the package itself, not a cycle of code
    cycles = [c for c in cycles if "raysmol" not in c]
    assert not cycles, cycles


def test_no_private_names_across_packages():
    bad = [f"{m}:{line} takes {n} from {target}" for m, imps in _imports().items()
           for target, names, line in imps for n in names
           if n.startswith("_") and _package(target) != _package(m)]
    assert not bad, bad
