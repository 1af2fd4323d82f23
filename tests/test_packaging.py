"""Packaging: the package installs anywhere.

An isolated build (``python -m build``: the sdist, then the wheel from it, each in a throw-away
environment without torch) gives a pure-Python ``py3-none-any`` wheel that carries the C++ sources
(the top-level ``csrc/`` as ``macl_kernels/csrc/``) and no compiled file. Installed into a fresh
virtual environment with the pinned torch (the Makefile's ``TORCH_SPEC``) and the pins of
requirements-dev.txt, it works: ``info`` says backend ``cpu`` is buildable on first use (from the
wheel's sources) and ``verify`` passes; with no C++ compiler on PATH, ``info`` says ``cpu`` is
missing and why, and ``auto`` warns once and computes the loss with backend ``torch``.

Everything runs in subprocesses outside the repository (a copy of the build inputs; the fresh
environment's interpreter from a temporary working directory), so that the tree's own
``macl_kernels`` (and its in-place ``_C_cpu``) can never be what is tested. Marked slow: the fresh
environment installs torch (tens of seconds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# What builds the package (an sdist holds these and nothing it does not need).
BUILD_INPUTS = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE",
                "CHANGELOG.md", "macl_kernels", "csrc")
COMPILED_SUFFIXES = (".so", ".pyd", ".dll", ".dylib", ".o")
PURE_PYTHON_NOTE = "building the pure-Python package WITHOUT the ahead-of-time extensions"


def _torch_spec() -> str:
    """The Makefile's torch pin (``TORCH_SPEC ?= torch==X``): the torch ``make install`` uses."""
    match = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile defines no TORCH_SPEC"
    return match.group(1)


def _dev_pin(name: str) -> str:
    """``name==version`` as requirements-dev.txt pins it."""
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        if re.match(rf"^{re.escape(name)}==\S+$", line.strip()):
            return line.strip()
    raise AssertionError(f"requirements-dev.txt pins no {name}")


def _run(cmd, *, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
        f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _tree_sources() -> list:
    """Every file of the tree's csrc/cpu and csrc/cuda but compiled ones, relative to csrc/
    (``cpu/x.cpp``): a first-use build needs them all, so a new kind of file (a ``.hpp``) that
    setup.py's patterns miss fails here, not in a user's first-use build."""
    return sorted(p.relative_to(ROOT / "csrc").as_posix()
                  for part in ("cpu", "cuda") for p in (ROOT / "csrc" / part).rglob("*")
                  if p.is_file() and p.suffix not in COMPILED_SUFFIXES
                  and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """``python -m build`` on a copy of the build inputs (in-place extensions and all: the wheel
    must leave them out). Returns (sdist, wheel, the build's stderr)."""
    work = tmp_path_factory.mktemp("build")
    src = work / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    out = work / "dist"
    proc = _run([sys.executable, "-m", "build", "--outdir", out, src], cwd=work)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return sdists[0], wheels[0], proc.stdout + proc.stderr


def test_isolated_build_says_so(dist):
    """No torch in the isolated environment: the build goes through, says that no extension is
    compiled ahead of time (one note each time setup.py runs), and compiles nothing."""
    log = dist[2]
    assert PURE_PYTHON_NOTE in log, log[-4000:]
    assert "isolated build environment" in log
    assert "building macl_kernels._C_cpu" not in log, log[-4000:]


def test_wheel_is_pure_python_and_carries_the_sources(dist):
    _, wheel, _ = dist
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/WHEEL"))
        wheel_meta = zf.read(f"{dist_info}/WHEEL").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert "Root-Is-Purelib: true" in wheel_meta
    shipped = sorted(n[len("macl_kernels/csrc/"):] for n in names
                     if n.startswith("macl_kernels/csrc/"))
    assert shipped == _tree_sources()
    assert any(s.startswith("cpu/") and s.endswith(".cpp") for s in shipped)
    assert not [n for n in names if n.endswith(COMPILED_SUFFIXES)]
    assert not [n for n in names if n.startswith(("tests/", "bench/", "python/", "csrc/"))]
    assert "macl_kernels/__init__.py" in names
    assert "macl_kernels/primitive/backends/__init__.py" in names
    assert "macl_kernels/tools/cli.py" in names
    assert "macl-kernels = macl_kernels.tools.cli:main" in entry_points
    requires = re.findall(r"^Requires-Dist: (\S+)", metadata, re.M)
    assert "ninja" in requires and any(r.startswith("torch") for r in requires), requires


def test_sdist_builds_the_package_and_nothing_else(dist):
    sdist, _, _ = dist
    with tarfile.open(sdist) as tf:
        top = tf.getnames()[0].split("/")[0]
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
        shipped = sorted(n[len("csrc/"):] for n in names
                         if n.startswith(("csrc/cpu/", "csrc/cuda/"))
                         and tf.getmember(f"{top}/{n}").isfile())
    assert shipped == _tree_sources()
    for needed in ("setup.py", "pyproject.toml", "README.md", "LICENSE",
                   "macl_kernels/__init__.py"):
        assert needed in names, needed
    assert not [n for n in names if n.endswith(COMPILED_SUFFIXES)]
    assert not [n for n in names if n.startswith("tests/")]


@pytest.fixture(scope="module")
def fresh_env(dist, tmp_path_factory):
    """A fresh virtual environment with the pinned torch, numpy and ninja and the wheel; returns
    (its python, a working directory outside the repository, a JIT cache directory)."""
    base = tmp_path_factory.mktemp("fresh")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=base)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", "--no-input", _torch_spec(),
          _dev_pin("numpy"), _dev_pin("ninja"), dist[1]], cwd=base, timeout=900)
    cache = base / "cache"
    cache.mkdir()
    work = base / "work"
    work.mkdir()
    return python, work, cache


def _env(python: Path, cache: Path, *, compiler: bool) -> dict:
    """The environment of a fresh-env command: no PYTHONPATH (nothing of the tree), one torch
    thread, a private JIT cache; ``compiler=False``: PATH is the environment's bin/ alone (no
    cc/c++/g++/clang, no CC/CXX)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CC", "CXX", "TORCH_EXTENSIONS_DIR", "MACL_KERNELS_CACHE")}
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(cache),
               MACL_KERNELS_CACHE=str(cache))
    if not compiler:
        env["PATH"] = str(python.parent)
    return env


def _info(python: Path, work: Path, env: dict) -> dict:
    """``python -m macl_kernels info``: its first line (the package's location) and, per
    backend, its line (``usable`` / ``unusable: why``) and its ``build:`` line if any."""
    out = _run([python, "-m", "macl_kernels", "info"], cwd=work, env=env).stdout
    lines = out.splitlines()
    backends, build = {}, {}
    name = None
    for line in lines[lines.index("backends:") + 1:]:
        if re.match(r"^  \S", line):
            name, _, backends[name] = line.strip().partition(": ")
        elif line.startswith("    build: ") and name is not None:
            build[name] = line[len("    build: "):]
        elif not line.startswith("    "):
            break
    return {"head": lines[0], "backends": backends, "build": build, "text": out}


def test_fresh_env_info_and_verify(fresh_env):
    """The installed wheel (not the tree) runs: ``info`` lists every backend, ``reference`` and
    ``torch`` usable, ``cpu`` buildable on first use from the installed sources (the cache is
    empty: nothing is built by ``info`` or by ``verify`` of other backends); ``verify`` passes."""
    python, work, cache = fresh_env
    env = _env(python, cache, compiler=True)
    info = _info(python, work, env)
    assert str(python.parents[1]) in info["head"], info["head"]
    backends = info["backends"]
    assert set(backends) >= {"reference", "torch", "cpu", "triton", "cuda"}, info["text"]
    assert backends["torch"] == "usable", info["text"]
    assert backends["reference"] == "usable", info["text"]
    assert info["build"]["cpu"].startswith("buildable on first use: from "), info["text"]
    assert str(python.parents[1]) in info["build"]["cpu"], info["text"]  # the wheel's sources
    out = _run([python, "-m", "macl_kernels", "verify", "--backends", "torch"], cwd=work,
               env=env).stdout
    assert "backends: torch" in out, out


AUTO_WITHOUT_COMPILER = """
import json, warnings
import torch
import macl_kernels as mk
from macl_kernels.primitive import resolve_backend

g = torch.Generator().manual_seed(0)
z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    chosen = resolve_backend("auto", torch.device("cpu"))
    auto = [mk.infonce_loss(z1, z2).item() for _ in range(2)]
torch_loss = mk.infonce_loss(z1, z2, backend="torch").item()
print(json.dumps({"chosen": chosen, "auto": auto, "torch": torch_loss,
                  "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def test_fresh_env_without_compiler(fresh_env):
    """No compiler on PATH: ``info`` says ``cpu`` is missing and why (the compiler); ``auto``
    picks ``torch``, warns once about ``cpu``, and gives the ``torch`` backend's loss."""
    python, work, cache = fresh_env
    cache = cache.parent / "cache-no-compiler"  # nothing another test may have built
    cache.mkdir(exist_ok=True)
    env = _env(python, cache, compiler=False)
    assert shutil.which("c++", path=env["PATH"]) is None
    assert shutil.which("g++", path=env["PATH"]) is None
    info = _info(python, work, env)
    cpu = info["build"]["cpu"]
    assert cpu.startswith("missing: ") and "no C++ compiler" in cpu, info["text"]
    assert info["backends"]["torch"] == "usable", info["text"]

    out = _run([python, "-c", AUTO_WITHOUT_COMPILER], cwd=work, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["chosen"] == "torch", result
    assert result["auto"] == [result["torch"]] * 2, result
    about_cpu = [w for w in result["warnings"] if "'cpu'" in w]
    assert len(about_cpu) == 1 and about_cpu[0].startswith("RuntimeWarning"), result
