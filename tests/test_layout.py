"""The package's layout keeps its plan: layers import only downwards, no import cycle, imports at the top.

The layers, lowest first (README "Reading the code" and docs/reading-the-code.md draw them):

0. ``checks``, ``runtime``, ``kernels``: validators, process settings, Numba loops;
1. the physics core: ``nn``, ``optim``, ``neighbor``, ``se_e2_a``, ``compress``, ``model``, ``stats``;
2. ``io``: model files, systems, outputs, figures;
3. ``infer``: ``DeepPot``, the public inference interface (it reads model files, so it stands above ``io``);
4. ``training``, ``md``, ``active``: what is built on the model and its files;
5. ``cli``: the command line.

A module imports only from its own layer or below. Only the command line may import a minidp module inside a
function (so that ``minidp --help`` does not load every command's dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minidp"

LAYERS = {
    "minidp.checks": 0, "minidp.runtime": 0, "minidp.kernels": 0,
    "minidp.nn": 1, "minidp.optim": 1, "minidp.neighbor": 1, "minidp.se_e2_a": 1, "minidp.compress": 1,
    "minidp.type_embed": 1, "minidp.model": 1, "minidp.stats": 1,
    "minidp.io": 2,
    "minidp.infer": 3,
    "minidp.training": 4, "minidp.md": 4, "minidp.active": 4,
    "minidp.cli": 5, "minidp.__main__": 5,
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package's __init__ under the package's name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "examples" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def layer(name: str) -> int:
    """The layer of a module: its own entry, else its package's (``minidp.io.systems`` -> ``minidp.io``)."""
    while name not in LAYERS:
        if "." not in name:
            raise KeyError(name)
        name = name.rpartition(".")[0]
    return LAYERS[name]


def owner(name: str) -> str | None:
    """The minidp module an imported name belongs to (``minidp.io.systems.read_system`` -> ``minidp.io.systems``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


class Import:
    def __init__(self, target: str, line: int, in_function: bool):
        self.target, self.line, self.in_function = target, line, in_function


def imports(path: Path) -> list[Import]:
    """The minidp modules a file imports, with the line and whether the import stands inside a function."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in {owner(n) for n in names if n.startswith("minidp")} - {None, "minidp"}:
            found.append(Import(target, node.lineno, id(node) in inner))
    return found


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "minidp" and not _has_layer(m)] == []


def _has_layer(name: str) -> bool:
    try:
        layer(name)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m != "minidp"))
def test_a_module_imports_only_its_layer_or_below(name):
    upward = [f"{MODULES[name].name}:{i.line} imports {i.target} (layer {layer(i.target)} > {layer(name)})"
              for i in GRAPH[name] if i.target != name and layer(i.target) > layer(name)]
    assert upward == []


def test_no_minidp_import_inside_a_function_outside_the_command_line():
    local = [f"{MODULES[m]}:{i.line} ({i.target})" for m, found in GRAPH.items()
             if m != "minidp.cli" for i in found if i.in_function]
    assert local == []


def test_no_import_cycle():
    edges = {m: {i.target for i in found if i.target != m} for m, found in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_top_of_the_package_stays_small():
    top = [p for p in PACKAGE.glob("*.py")]
    assert len(top) <= 15, sorted(p.name for p in top)
