"""The package layout's import rule, read from the source (``docs/layout.md`` explains it).

Each module of ``launcher/`` belongs to a layer: its package under ``launcher/`` (``sandbox``,
``data``, ...), or its own name for a top-level module (``host``, ``executor``, ``client``,
the shared leaves). ``ALLOWED`` says which layers a layer may import; the tests walk every
module's imports with ``ast`` (no import runs) and check them against it, check that no import
hides inside a function, and that the module graph has no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "launcher"

# Shared leaves: importable by every layer, importing only each other (``launcher`` is the
# package's ``__init__``: the version string, nothing else).
LEAVES = frozenset(
    {"launcher", "errors", "resources", "inputs", "yamlfile", "config", "atomic", "filelock"}
)

# Layer -> the layers it may import (always also itself). Top to bottom; ``cli`` alone may
# import everything. The same table is in docs/layout.md.
ALLOWED: dict[str, frozenset[str]] = {
    "cli": frozenset(),  # everything; filled in below
    "mcp": LEAVES | {"host", "executor", "sandbox", "data", "model", "client", "link", "protocol"},
    "worker": LEAVES | {"host", "executor", "sandbox", "data", "model", "link", "protocol"},
    "flight": LEAVES | {"controlplane", "model", "link", "protocol"},
    "controlplane": LEAVES | {"model", "link", "protocol"},
    "client": LEAVES | {"link", "protocol"},
    "host": LEAVES | {"executor", "sandbox", "data", "model"},
    "executor": LEAVES | {"sandbox", "data", "model"},
    "sandbox": LEAVES | {"model", "protocol"},
    "data": LEAVES | {"model"},
    "link": LEAVES | {"protocol"},
    "model": LEAVES,
    "protocol": frozenset(),
    **{leaf: LEAVES for leaf in LEAVES},
}
ALLOWED["cli"] = frozenset(ALLOWED)

# Imports inside a function, each with why it cannot be at the top. Empty: a function-local
# import that dodges a cycle means a module is in the wrong layer.
LOCAL_IMPORTS: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (a module of launcher, never a class or function)
    line: int
    local: bool  # inside a function


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def layer(module: str) -> str:
    parts = module.split(".")
    return "launcher" if len(parts) == 1 else parts[1]


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """The launcher modules ``module`` imports. ``from P import name`` counts as importing the
    module ``P.name`` when there is one (``from . import metadata``), else ``P``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    local = {id(n) for f in ast.walk(tree) if isinstance(f, _FUNCTIONS) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "launcher":
                yield Import(module, _existing(target), node.lineno, id(node) in local)


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _existing(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


IMPORTS = [i for module, path in MODULES.items() for i in imports_of(module, path)]


def where(i: Import) -> str:
    return f"{MODULES[i.importer].relative_to(PACKAGE.parent)}:{i.line}: {i.imported}"


def test_every_module_has_a_layer_in_the_table() -> None:
    assert {layer(m) for m in MODULES} <= set(ALLOWED)


def test_imports_go_down_only() -> None:
    wrong = {
        f"{where(i)} ({layer(i.importer)} may not import {layer(i.imported)})": None
        for i in IMPORTS
        if layer(i.imported) != layer(i.importer)
        and layer(i.imported) not in ALLOWED[layer(i.importer)]
    }
    assert not wrong, "imports against the layer table:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("importer", "never"),
    [
        ("sandbox", {"data"}),
        ("data", {"sandbox"}),
        ("controlplane", {"worker", "sandbox", "data", "host", "executor"}),
        ("flight", {"worker", "sandbox", "data", "host", "executor"}),
        ("client", {"controlplane", "flight", "worker"}),
    ],
)
def test_the_table_keeps_the_walls(importer: str, never: set[str]) -> None:
    """The rules the table must never loosen, so an edit to it shows up here."""
    assert not ALLOWED[importer] & never


def test_only_cli_may_import_every_layer() -> None:
    assert [name for name, allowed in ALLOWED.items() if allowed >= set(ALLOWED)] == ["cli"]


def test_no_import_inside_a_function() -> None:
    local = [where(i) for i in IMPORTS if i.local and i.importer not in LOCAL_IMPORTS]
    assert not local, "imports inside functions (move them up, or fix the layering):\n" + (
        "\n".join(local)
    )


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        # A package is always imported before its modules: that edge is not a cycle.
        if not i.importer.startswith(i.imported + "."):
            graph[i.importer].add(i.imported)
    cycles = [c for c in _components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_walk_sees_imports() -> None:
    """The walk itself: it finds a relative, an absolute and a ``from . import`` import."""
    found = {(i.importer, i.imported) for i in IMPORTS}
    assert ("launcher.flight.service", "launcher.flight.metadata") in found  # from . import
    assert ("launcher.flight.service", "launcher.controlplane.apikeys") in found  # absolute
    assert ("launcher.data.cache", "launcher.data.objectstore") in found  # relative
