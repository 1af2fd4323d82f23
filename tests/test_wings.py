"""The package's three wings (docs/design.md, "Three wings") and their one rule.

- the **primitive** (``macl_kernels/primitive/``): protocol, custom ops, backend registry, backends;
- the **library** (the package root: losses, modules, GradCache, distributed, validation, reference);
- the **tools** (``macl_kernels/tools/`` and the ``python -m macl_kernels`` entry point).

Imports go downwards only (tools -> library -> primitive, tools -> primitive), and an import across
wings names only public things: no module on the path and no imported name may start with a single
underscore (``_assembly``, ``_blocks``); inside a wing anything goes. And no module of the package
is over ``MAX_LINES`` lines. Every ``import`` counts, at module level or inside a function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest

from test_import_cycles import PACKAGE, ImportEdge, import_edges, module_files

MAX_LINES = 900

# Which wings each wing may import from (besides itself).
ALLOWED = {
    "primitive": set(),
    "library": {"primitive"},
    "tools": {"library", "primitive"},
}


# The library uses the primitive through the package's surface, its ``__init__`` (the tools may
# look deeper: the kernel inventory compiles the Triton backend's kernels).
SURFACE = {"primitive": f"{PACKAGE}.primitive"}


Edge = ImportEdge


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("primitive", "tools"):
        return parts[1]
    if module == f"{PACKAGE}.__main__":  # `python -m macl_kernels`: the command line, a tool
        return "tools"
    return "library"


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def violations(all_edges: List[Edge]) -> List[str]:
    """One sentence per import that breaks the wings' rule."""
    found = []
    for e in all_edges:
        src, dst = wing(e.importer), wing(e.target)
        if src == dst:
            continue
        where = f"{e.importer} (line {e.line}) imports {e.path}" + (f".{e.name}" if e.name else "")
        if dst not in ALLOWED[src]:
            found.append(f"{where}: the {src} wing may not import the {dst} wing")
            continue
        private = [p for p in e.path.split(".")[1:] if _private(p)]
        if e.name is not None and _private(e.name):
            private.append(e.name)
        if private:
            found.append(f"{where}: private name(s) {private} of the {dst} wing")
        elif src == "library" and e.target != SURFACE["primitive"]:
            found.append(f"{where}: the library reaches the primitive through "
                         f"{SURFACE['primitive']} only (a backend's helper is not the library's)")
    return found


def test_the_wings_exist_and_the_parser_sees_them():
    """Guards against a vacuous pass: the modules fall into all three wings and the known
    cross-wing imports are found."""
    modules = module_files()
    wings = {wing(m) for m in modules}
    assert wings == {"primitive", "library", "tools"}
    found = import_edges(modules)
    pairs = {(wing(e.importer), wing(e.target)) for e in found}
    assert ("library", "primitive") in pairs  # the losses call the primitive
    assert ("tools", "library") in pairs  # the cases run the losses
    assert ("tools", "primitive") in pairs  # info reports the backends


@pytest.mark.parametrize("importer,target,path,name,expected", [
    # a private module of another wing
    ("macl_kernels.functional", "macl_kernels.primitive.ops", "macl_kernels.primitive._ops", None,
     "private"),
    # a private name from a public module of another wing
    ("macl_kernels.tools.cases", "macl_kernels.functional", "macl_kernels.functional", "_blocks",
     "private"),
    # upwards: the library may not import the tools, the primitive not the library
    ("macl_kernels.functional", "macl_kernels.tools.cases", "macl_kernels.tools.cases", "CASES",
     "may not import"),
    ("macl_kernels.primitive.ops", "macl_kernels._math", "macl_kernels._math", "autocast_off",
     "may not import"),
    # allowed: public names across wings, private ones inside a wing, dunders
    ("macl_kernels.functional", "macl_kernels.primitive", "macl_kernels.primitive", "negative_lse",
     None),
    ("macl_kernels.functional", "macl_kernels._validate", "macl_kernels._validate", "_check", None),
    ("macl_kernels.tools.bench", "macl_kernels", "macl_kernels", "__version__", None),
    ("macl_kernels.tools.inventory", "macl_kernels.primitive.backends", "macl_kernels.primitive.backends",
     "kernel_backend", None),
    # the library past the primitive's surface: a backend's public helper
    ("macl_kernels.supervised", "macl_kernels.primitive.backends.torch_chunked",
     "macl_kernels.primitive.backends.torch_chunked", "default_chunk", "primitive through"),
])
def test_violations_are_found(importer, target, path, name, expected):
    found = violations([Edge(importer, target, path, name, 1)])
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


def test_no_import_across_wings_breaks_the_rule():
    found = violations(import_edges())
    assert not found, "\n".join(found)


def too_long(files: Dict[str, Path]) -> Dict[str, int]:
    """The modules over ``MAX_LINES`` lines, with their line counts."""
    counts = {name: len(path.read_text().splitlines()) for name, path in files.items()}
    return {name: n for name, n in counts.items() if n > MAX_LINES}


def test_no_module_is_too_long():
    long = too_long(module_files())
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_too_long_finds_a_long_module(tmp_path):
    ok, big = tmp_path / "ok.py", tmp_path / "big.py"
    ok.write_text("x = 1\n" * MAX_LINES)
    big.write_text("x = 1\n" * (MAX_LINES + 1))
    assert too_long({"ok": ok, "big": big}) == {"big": MAX_LINES + 1}
