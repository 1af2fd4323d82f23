"""The runnable examples in python/ run end to end (tiny settings)."""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every test here runs an example script in a subprocess (torchrun for the DDP one).
pytestmark = pytest.mark.slow


def run(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_quickstart():
    proc = run([sys.executable, "python/quickstart.py", "--steps", "3", "--batch-size", "64"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "float64 check vs reference" in proc.stdout


@pytest.mark.parametrize("nproc", [2])
def test_train_ddp_with_torchrun(nproc):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:  # torchrun ships with torch; its absence is a broken install
        pytest.fail("torchrun not found next to the Python interpreter")
    proc = run([torchrun, "--standalone", f"--nproc_per_node={nproc}", "python/train_ddp.py",
                "--steps", "3", "--batch-size", "64", "--check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"worst relative difference ([0-9.e+-]+)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) <= 1e-5  # float32: DDP step == single-process step
    assert f"{nproc} rank(s)" in proc.stdout


# The public API an example may use: the names of ``macl_kernels.__all__`` and the public modules
# the README documents (``macl_kernels.distributed.shutdown``); never the primitive, the tools or
# a private module or name.
PUBLIC_MODULES = {"distributed"}


def _non_public_uses(path: str):
    import macl_kernels as mk

    public = set(mk.__all__) | PUBLIC_MODULES
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    aliases, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "macl_kernels":
                    aliases.add(alias.asname or alias.name)
                elif (alias.name.startswith("macl_kernels.")
                      and alias.name.split(".")[1] not in PUBLIC_MODULES):
                    bad.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            parts = node.module.split(".")
            if parts[0] != "macl_kernels":
                continue
            if len(parts) > 1 and parts[1] not in PUBLIC_MODULES:
                bad.append((node.lineno, f"from {node.module} import ..."))
            elif len(parts) == 1:
                bad += [(node.lineno, f"from macl_kernels import {a.name}") for a in node.names
                        if a.name not in public]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr not in public):
            bad.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return sorted(bad)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "python", "*.py"))),
                         ids=os.path.basename)
def test_examples_use_the_public_api_only(path):
    assert _non_public_uses(path) == []


def test_public_api_check_finds_internal_imports(tmp_path):
    example = tmp_path / "example.py"
    example.write_text("import macl_kernels as mk\n"
                       "from macl_kernels.primitive.backends import resolve_backend\n"
                       "import macl_kernels.tools.cases\n"
                       "from macl_kernels import _math, macl_loss\n"
                       "mk._validate, mk.macl_loss, mk.distributed.shutdown\n")
    assert [what for _, what in _non_public_uses(str(example))] == [
        "from macl_kernels.primitive.backends import ...", "import macl_kernels.tools.cases",
        "from macl_kernels import _math", "mk._validate"]
