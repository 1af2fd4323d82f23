"""The package has no import cycles: every ``import`` of a ``macl_kernels`` module, at module level
or inside a function (a lazy import hides a cycle at import time, not in the design), relative or
absolute, is an edge of a graph over the package's modules, and that graph is acyclic.

``from X import name`` is an edge to ``X.name`` when that is a module (``from . import x``: the
submodule ``x``), else to ``X`` itself; a package ``X`` means its ``__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Set

import macl_kernels

ROOT = Path(macl_kernels.__file__).resolve().parent
PACKAGE = "macl_kernels"


def module_files() -> Dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name: its __init__)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _base_package(module: str, path: Path, level: int) -> str:
    """The package a ``level``-dot relative import in ``module`` starts from."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return package


def _known(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """``name`` or its longest prefix that is a module of the package (``None`` outside it)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


class ImportEdge(NamedTuple):
    importer: str  # dotted module name
    target: str  # dotted module name (the longest prefix that is a module of the package)
    path: str  # the dotted path as written, absolute (``macl_kernels.primitive.ops``)
    name: Optional[str]  # the imported name of ``from X import name`` (not a module), else None
    line: int


def import_edges(modules: Optional[Dict[str, Path]] = None) -> List[ImportEdge]:
    """Every import of a package module by a package module (also inside functions)."""
    modules = module_files() if modules is None else modules
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # module level and inside functions alike
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known(alias.name, modules) \
                        if alias.name.split(".")[0] == PACKAGE else None
                    if target is not None:
                        edges.append(ImportEdge(module, target, alias.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _base_package(module, path, node.level)
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:  # `from pkg import module`: the name is a module
                        edges.append(ImportEdge(module, submodule, submodule, None, node.lineno))
                    elif (target := _known(source, modules)) is not None:
                        edges.append(ImportEdge(module, target, source, alias.name, node.lineno))
    return edges


def import_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {name: set() for name in module_files()}
    for edge in import_edges():
        if edge.target != edge.importer:
            graph[edge.importer].add(edge.target)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as ``[a, b, ..., a]``, or ``None``."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {name: WHITE for name in graph}
    stack: List[str] = []

    def visit(name: str) -> Optional[List[str]]:
        colour[name] = GREY
        stack.append(name)
        for nxt in sorted(graph[name]):
            if colour[nxt] == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == WHITE:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[name] = BLACK
        return None

    for name in sorted(graph):
        if colour[name] == WHITE:
            found = visit(name)
            if found:
                return found
    return None


def test_the_graph_sees_the_package():
    """Guards against a vacuous pass: the parser finds the modules and their known imports."""
    graph = import_graph()
    assert {"macl_kernels", "macl_kernels.primitive.ops", "macl_kernels.primitive.backends",
            "macl_kernels.primitive.backends.cpu"} <= set(graph)
    assert "macl_kernels.primitive.protocol" in graph["macl_kernels.primitive.ops"]  # from ._primitive import
    assert "macl_kernels.primitive.backends" in graph["macl_kernels.primitive.ops"]  # from .backends import
    assert "macl_kernels.primitive.protocol" in graph["macl_kernels.primitive.backends.cpu"]  # from .._primitive
    assert "macl_kernels.functional" in graph["macl_kernels.tools.cases"]  # from . import functional


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
