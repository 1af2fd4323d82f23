"""The ``cpu`` extension's three build states (``macl_kernels/primitive/backends/_native.py``):
built (ahead of time, or a cached first-use build), buildable on first use (sources, a C++
compiler and ninja here), missing (and why); the first-use build itself (slow: it compiles the
kernels), and what ``auto`` does when nothing can be built.
"""

from __future__ import annotations

import ast
import os
import tempfile
from pathlib import Path
import warnings

import pytest
import torch

import macl_kernels as mk
from conftest import assert_same_results, loss_and_grads, make_pair
from macl_kernels.primitive import backends
from macl_kernels.primitive.backends import _native
from macl_kernels.primitive.backends import cpu as CPU
from macl_kernels.primitive.protocol import BUILD, missing_build
from macl_kernels.tools.report import info_lines

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hidden_aot():
    raise ImportError("the ahead-of-time module is hidden by the test")


def _cpu_extension(monkeypatch, cache) -> _native.Extension:
    """A fresh ``cpu`` extension whose ahead-of-time module does not import, with its first-use
    builds cached under ``cache``, installed as the cpu backend's."""
    monkeypatch.setenv("MACL_KERNELS_CACHE", str(cache))
    monkeypatch.delenv("MACL_KERNELS_JIT", raising=False)
    ext = _native.Extension("macl_kernels._C_cpu", jit_part="cpu")
    monkeypatch.setattr(ext, "_import_aot", _hidden_aot)
    monkeypatch.setattr(CPU, "_EXTENSION", ext)
    monkeypatch.setattr(backends, "_WARNED", set())
    return ext


def _no_compiler(monkeypatch, tmp_path):
    """PATH without c++ / g++ (an empty folder) and CXX pointing nowhere."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))


def test_sources_are_found_and_cached_per_torch_and_python(monkeypatch, tmp_path):
    ext = _cpu_extension(monkeypatch, tmp_path)
    assert _native.source_dir("cpu") is not None
    folder = ext.build_dir()
    assert folder.parent == tmp_path / f"{torch.__version__}-{__import__('sys').implementation.cache_tag}"
    assert folder.name.startswith("_C_cpu-")


def test_buildable_when_compiler_and_sources_are_here(monkeypatch, tmp_path):
    if _native.compiler() is None or _native.ninja() is None:
        pytest.skip("no C++ compiler or ninja on this machine")
    ext = _cpu_extension(monkeypatch, tmp_path)
    state = ext.state()
    assert state.status == _native.BUILDABLE, state
    # Buildable counts as supported: the build happens when the backend is first needed.
    assert CPU.BACKEND.not_supported_reasons(torch.device("cpu")) == []
    assert not any(tmp_path.iterdir()), "state() must not build"
    lines = "\n".join(info_lines())
    assert "  cpu: usable" in lines and "build: buildable on first use" in lines


def test_jit_switch_off_means_missing(monkeypatch, tmp_path):
    ext = _cpu_extension(monkeypatch, tmp_path)
    monkeypatch.setenv("MACL_KERNELS_JIT", "0")
    state = ext.state()
    assert state.status == _native.MISSING and "MACL_KERNELS_JIT=0" in state.detail
    assert ext.get() is None


def test_no_compiler_auto_warns_once_and_uses_torch(monkeypatch, tmp_path):
    ext = _cpu_extension(monkeypatch, tmp_path)
    _no_compiler(monkeypatch, tmp_path)
    state = ext.state()
    assert state.status == _native.MISSING and "no C++ compiler" in state.detail, state
    reasons = CPU.BACKEND.not_supported_reasons(torch.device("cpu"))
    assert missing_build(reasons) and reasons[0].kind == BUILD
    assert "no C++ compiler" in reasons[0] and "pip install --no-build-isolation" in reasons[0]
    lines = "\n".join(info_lines())
    assert "build: missing: " in lines and "no C++ compiler" in lines
    z1, z2 = make_pair(6, 4, seed=0)
    with pytest.warns(RuntimeWarning, match="passed over the native backend 'cpu'") as record:
        loss = mk.macl_loss(z1, z2, backend="auto")
    assert sum("passed over" in str(w.message) for w in record) == 1
    assert loss.item() == pytest.approx(mk.macl_loss(z1, z2, backend="torch").item(), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second call is silent
        assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        mk.macl_loss(z1, z2, backend="cpu")
    assert not any(tmp_path.glob("*/_C_cpu-*")), "no build may be attempted without a compiler"


def test_failed_build_is_missing_with_the_compilers_error(monkeypatch, tmp_path):
    """A first-use build that fails (here: a flag the compiler refuses, at once) makes the
    extension missing with the compiler's error; ``auto`` then warns once and uses ``torch``,
    an explicit ``backend="cpu"`` raises with it, and no second build is attempted."""
    if _native.compiler() is None or _native.ninja() is None:
        pytest.skip("no C++ compiler or ninja on this machine")
    ext = _cpu_extension(monkeypatch, tmp_path)
    monkeypatch.setenv("MACL_CPU_ARCH_FLAGS", "-mno-such-flag-for-the-test")
    assert ext.state().status == _native.BUILDABLE
    with pytest.warns(RuntimeWarning, match="passed over the native backend 'cpu'"):
        assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    state = ext.state()
    assert state.status == _native.MISSING, state
    assert "failed" in state.detail and "-mno-such-flag-for-the-test" in state.detail
    monkeypatch.setattr(ext, "_jit_build", lambda: pytest.fail("built twice"))
    with pytest.raises(RuntimeError, match="no-such-flag"):
        backends.resolve_backend("cpu", torch.device("cpu"))


def test_a_versioned_rebuild_is_found_in_the_cache(monkeypatch, tmp_path):
    """torch names a second build of one extension in one process ``_C_cpu_v1`` (a failed first
    try counts): the cache lookup takes the newest of the versioned files, else the plain one."""
    ext = _cpu_extension(monkeypatch, tmp_path)
    folder = ext.build_dir()
    folder.mkdir(parents=True)
    assert ext._cached_library() is None
    (folder / "_C_cpu.so").write_bytes(b"")
    assert ext._cached_library() == folder / "_C_cpu.so"
    for version, mtime in ((2, 2_000_000_000), (1, 1_000_000_000)):  # v2 the newer
        (folder / f"_C_cpu_v{version}.so").write_bytes(b"")
        os.utime(folder / f"_C_cpu_v{version}.so", (mtime, mtime))
    assert ext._cached_library() == folder / "_C_cpu_v2.so"


def test_import_and_info_build_nothing(monkeypatch, tmp_path):
    """``import macl_kernels`` loads no extension, and asking about the backends (``info``,
    ``available_backends``) with only a first-use build possible compiles nothing."""
    import subprocess
    import sys

    env = dict(os.environ, MACL_KERNELS_CACHE=str(tmp_path), PYTHONPATH=REPO_ROOT)
    code = ("import sys, macl_kernels; "
            "assert not [m for m in sys.modules if m.startswith('macl_kernels._C')], sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _cpu_extension(monkeypatch, tmp_path)
    info_lines()
    mk.available_backends()
    backends.resolve_backend("torch", torch.device("cpu"))
    assert not any(tmp_path.iterdir())


@pytest.fixture
def own_tmp_path():
    """A temporary folder outside pytest's numbered base folders: another pytest process of the
    same user (a second checkout's suite) prunes old base folders, and with them a build cache
    in the middle of this test."""
    with tempfile.TemporaryDirectory(prefix="macl_kernels_first_use_") as folder:
        yield Path(folder)


@pytest.mark.slow
def test_first_use_build_then_cached(monkeypatch, own_tmp_path, capfd):
    """The ahead-of-time module hidden: ``backend="cpu"`` builds the extension once (one line on
    stderr), its losses equal the torch backend's, and a fresh process state finds the cached
    build without building again."""
    if _native.compiler() is None or _native.ninja() is None:
        pytest.skip("no C++ compiler or ninja on this machine")
    tmp_path = own_tmp_path
    ext = _cpu_extension(monkeypatch, tmp_path)
    z1, z2 = make_pair(40, 8, seed=1)
    got = loss_and_grads(mk.macl_loss, z1, z2, backend="cpu")
    err = capfd.readouterr().err
    assert err.count("macl-kernels: building macl_kernels._C_cpu") == 1, err
    assert ext.state().status == _native.BUILT and "first use" in ext.state().detail
    assert ext.get().built_with_torch == torch.__version__
    assert_same_results(got, loss_and_grads(mk.macl_loss, z1, z2, backend="torch"), 1e-12)
    clip = lambda a, b, **kw: mk.clip_loss(a, b, 14.0, **kw)  # noqa: E731
    assert_same_results(loss_and_grads(clip, z1, z2, backend="cpu"),
                        loss_and_grads(clip, z1, z2, backend="torch"), 1e-12)
    again = _cpu_extension(monkeypatch, tmp_path)
    assert again.state().status == _native.BUILT and "cached" in again.state().detail
    _no_compiler(monkeypatch, tmp_path)  # a cached build needs no compiler
    assert again.get() is not None
    assert backends.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert "building" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# The first-use build compiles with setup.py's flags
# ---------------------------------------------------------------------------------------------


def _setup_py():
    with open(os.path.join(REPO_ROOT, "setup.py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def _setup_cpu_arch_flags():
    tree = _setup_py()
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name == "cpu_arch_flags")
    scope = {}
    exec(compile(ast.Module([func], []), "setup.py", "exec"),
         {"os": os, "platform": __import__("platform"), "shlex": __import__("shlex")}, scope)
    return scope["cpu_arch_flags"]


def _setup_cpu_extension_args():
    """setup.py's ``extra_compile_args`` / ``extra_link_args`` of ``macl_kernels._C_cpu``, with
    its names (the torch define, ``cpu_arch_flags()``) evaluated."""
    call = next(n for n in ast.walk(_setup_py()) if isinstance(n, ast.Call) and n.args
                and isinstance(n.args[0], ast.Constant) and n.args[0].value == "macl_kernels._C_cpu")
    flags = _setup_cpu_arch_flags()

    def values(node):
        out = []
        for item in node.elts:
            if isinstance(item, ast.Constant):
                out.append(item.value)
            elif isinstance(item, ast.Name) and item.id == "torch_version":
                out.append(f'-DMACL_BUILT_WITH_TORCH="{torch.__version__}"')
            elif isinstance(item, ast.Starred):
                assert ast.unparse(item.value) == "cpu_arch_flags()", ast.unparse(item)
                out.extend(flags())
            else:
                raise AssertionError(f"unexpected setup.py argument {ast.unparse(item)}")
        return out

    kw = {k.arg: k.value for k in call.keywords}
    return values(kw["extra_compile_args"]), values(kw["extra_link_args"])


@pytest.mark.parametrize("arch", [None, "native", "", "-mavx512f -mfma"])
def test_first_use_build_uses_setup_py_flags(arch, monkeypatch):
    if arch is None:
        monkeypatch.delenv("MACL_CPU_ARCH_FLAGS", raising=False)
    else:
        monkeypatch.setenv("MACL_CPU_ARCH_FLAGS", arch)
    assert _native.cpu_arch_flags() == _setup_cpu_arch_flags()()
    compile_args, link_args = _setup_cpu_extension_args()
    assert _native.cpu_compile_args() == compile_args
    assert list(_native.CPU_LINK_ARGS) == link_args
