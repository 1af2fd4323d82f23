"""Shared plumbing of the compiled backends (``cpu``: ``macl_kernels._C_cpu``; ``cuda``:
``macl_kernels._C_cuda``): import the extension once, remember why it failed, and, for the
``cpu`` one, build it on first use when it was not built ahead of time.

Three build states (``Extension.state()``, printed per native backend by ``macl-kernels info``):

* ``built``: the ahead-of-time module imports (``pip install --no-build-isolation .``,
  ``make install``), or a first-use build of these sources for this torch and Python is cached;
* ``buildable``: not built, but the C++ sources, a C++ compiler and ninja are here: the first
  call that needs the backend compiles it with ``torch.utils.cpp_extension.load`` (one line on
  stderr says so), into ``$MACL_KERNELS_CACHE`` (default ``~/.cache/macl_kernels``) /
  ``<torch version>-<python tag>`` / ``<module>-<hash of sources and flags>``;
* ``missing``: neither, and why (``MACL_KERNELS_JIT=0``, no sources, no compiler, a failed
  build).

Nothing is built at ``import macl_kernels``: only ``Extension.get()`` builds, and the backends
call it when they are chosen (``resolve_backend``) or run. The flags are setup.py's
(``cpu_arch_flags`` and the compile arguments of ``_C_cpu``; ``tests/test_native_build.py``
holds the two to the same list).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch

BUILT, BUILDABLE, MISSING = "built", "buildable", "missing"


class BuildState(NamedTuple):
    """``status``: ``BUILT``, ``BUILDABLE`` or ``MISSING``; ``detail``: where it was loaded or
    will be built from, or why it is missing."""

    status: str
    detail: str


def cpu_arch_flags() -> List[str]:
    """setup.py's ``cpu_arch_flags``: ``MACL_CPU_ARCH_FLAGS`` (``native``: ``-march=native``),
    else ``-mavx2 -mfma`` on x86_64 and the compiler's default target elsewhere."""
    value = os.environ.get("MACL_CPU_ARCH_FLAGS")
    if value is not None:
        value = value.strip()
        return ["-march=native"] if value == "native" else shlex.split(value)
    if platform.machine().lower() in ("x86_64", "amd64", "x64"):
        return ["-mavx2", "-mfma"]
    return []


def cpu_compile_args() -> List[str]:
    """The compile arguments setup.py gives ``macl_kernels._C_cpu`` (the torch version define
    included), so that a first-use build is the ahead-of-time one."""
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-std=c++20",
            f'-DMACL_BUILT_WITH_TORCH="{torch.__version__}"', *cpu_arch_flags()]


CPU_LINK_ARGS = ("-fopenmp",)


def jit_enabled() -> bool:
    return os.environ.get("MACL_KERNELS_JIT", "1").strip().lower() not in ("0", "false", "no",
                                                                            "off")


def cache_root() -> Path:
    """Where first-use builds live: ``$MACL_KERNELS_CACHE``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, then ``macl_kernels``; one folder per torch version and Python."""
    base = os.environ.get("MACL_KERNELS_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "macl_kernels")
    return Path(base) / f"{torch.__version__}-{sys.implementation.cache_tag}"


def source_dir(part: str) -> Optional[Path]:
    """``csrc/<part>``: the package data of a wheel (``macl_kernels/csrc``), else the source
    tree's top-level ``csrc/``; ``None`` when neither holds it."""
    package = Path(__file__).resolve().parents[2]  # macl_kernels/
    for root in (package / "csrc", package.parent / "csrc"):
        if (root / part).is_dir() and any((root / part).glob("*.cpp")):
            return root / part
    return None


def compiler() -> Optional[str]:
    """The C++ compiler torch's builder would run (``$CXX``, else ``c++``), if it exists."""
    cxx = os.environ.get("CXX", "c++").strip()
    return shutil.which(shlex.split(cxx)[0]) if cxx else None


def _ninja_dirs() -> List[str]:
    """Folders that may hold ``ninja``: the ``ninja`` package's (as setup.py puts it on PATH)
    and this Python's ``bin/``."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the pip package

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return dirs


def ninja() -> Optional[str]:
    path = os.environ.get("PATH", "")
    return shutil.which("ninja", path=os.pathsep.join(_ninja_dirs() + [path]))


class Extension:
    """A compiled extension module, imported on first use; ``get()`` is ``None`` when it cannot
    be imported (not built, or built against another torch) and ``error`` says why.

    ``jit_part`` (``"cpu"``): the ``csrc/`` folder it is built from on first use when the
    ahead-of-time module does not import; ``None``: ahead of time only (``cuda``)."""

    def __init__(self, name: str, jit_part: Optional[str] = None):
        self.name = name
        self.jit_part = jit_part
        self._module = None
        self.error: Optional[str] = None  # why the ahead-of-time module does not import
        self.build_error: Optional[str] = None  # why a first-use build failed
        self.origin: Optional[str] = None  # the file it was loaded from
        self._build_dir: Optional[Path] = None
        self._first_use = False  # the module came from a first-use build (now or cached)

    # -- the ahead-of-time module ------------------------------------------------------------
    def _import_aot(self):
        return importlib.import_module(self.name)

    def _try_aot(self):
        if self._module is None and self.error is None and not self._first_use:
            try:
                self._module = self._import_aot()
                self.origin = getattr(self._module, "__file__", None)
            except ImportError as exc:
                self.error = f"{type(exc).__name__}: {exc}"
        return self._module

    # -- the first-use build -----------------------------------------------------------------
    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def _sources(self) -> List[Path]:
        folder = source_dir(self.jit_part) if self.jit_part else None
        return sorted(folder.glob("*.cpp")) if folder is not None else []

    def build_dir(self) -> Optional[Path]:
        """The cache folder of a first-use build of the current sources and flags (``None``
        without sources): a new package version or flag gets a folder of its own."""
        if self._build_dir is not None:
            return self._build_dir
        sources = self._sources()
        if not sources:
            return None
        digest = hashlib.sha256()
        for path in sorted(sources[0].parent.iterdir()):
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        digest.update("\0".join(cpu_compile_args() + list(CPU_LINK_ARGS)).encode())
        self._build_dir = cache_root() / f"{self.short_name}-{digest.hexdigest()[:16]}"
        return self._build_dir

    def _cached_library(self) -> Optional[Path]:
        folder = self.build_dir()
        if folder is None:
            return None
        suffix = ".pyd" if os.name == "nt" else ".so"
        # torch names a rebuild of an extension already loaded (or tried) in the same process
        # `<name>_v1`, `_v2`, ...: the newest of those, else the plain name.
        versioned = sorted(folder.glob(f"{self.short_name}_v*{suffix}"),
                           key=lambda path: path.stat().st_mtime, reverse=True)
        for library in [*versioned, folder / f"{self.short_name}{suffix}"]:
            if library.is_file():
                return library
        return None

    def _jit_missing(self) -> Optional[str]:
        """Why no first-use build can be attempted here (``None``: it can)."""
        if self.jit_part is None:
            return "it is built ahead of time only (setup.py), never on first use"
        if not jit_enabled():
            return "the first-use build is disabled (MACL_KERNELS_JIT=0)"
        if not self._sources():
            return (f"its C++ sources (csrc/{self.jit_part}) are not installed with the package "
                    f"nor in a source tree")
        if compiler() is None:
            return (f"no C++ compiler was found (CXX={os.environ.get('CXX', 'c++')!r} is not on "
                    f"PATH): install g++ >= 10 or clang >= 12 to build it on first use")
        if ninja() is None:
            return "ninja was not found (torch builds extensions with it): pip install ninja"
        return None

    def _load_cached(self):
        library = self._cached_library()
        if library is None:
            return None
        folder = library.parent
        # The module's name is the file's (`_C_cpu_v1` exports `PyInit__C_cpu_v1`).
        name = f"{self.name.rpartition('.')[0]}.{library.name.split('.')[0]}"
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:  # a broken cache: say so rather than build over it
            self.build_error = (f"the cached first-use build {library} did not import ({exc}); "
                                f"delete {folder} to build it again")
            return None
        self.origin = str(library)
        return module

    def _jit_build(self):
        from torch.utils import cpp_extension

        folder = self.build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        print(f"macl-kernels: building {self.name} for torch {torch.__version__} on first use "
              f"(once; about a minute) in {folder}", file=sys.stderr, flush=True)
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join(
            [d for d in _ninja_dirs() if d not in path.split(os.pathsep)] + [path])
        try:
            module = cpp_extension.load(
                self.short_name, [str(s) for s in self._sources()],
                # ninja runs each command through the shell: quote the flags (the torch
                # define's quotes must reach the compiler, as setup.py's builder passes them).
                extra_cflags=[shlex.quote(f) for f in cpu_compile_args()],
                extra_ldflags=list(CPU_LINK_ARGS),  # a copy: torch appends to it
                build_directory=str(folder), verbose=False)
        except Exception as exc:  # a compiler error, a linker error, ninja's RuntimeError
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            # The compiler's own "error:" lines say what went wrong; ninja's last line, that it
            # stopped.
            shown = [line for line in lines if "error:" in line][:2] or lines[-2:]
            self.build_error = (f"building it on first use in {folder} failed "
                                f"({type(exc).__name__}: {' '.join(shown)[:400]})")
            return None
        finally:
            os.environ["PATH"] = path
        self.origin = getattr(module, "__file__", None) or str(folder)
        return module

    # -- what the backends and `info` ask ------------------------------------------------------
    def get(self):
        """The module: the ahead-of-time one, a cached first-use build, or one built now (when
        ``state()`` is ``BUILDABLE``); ``None`` when none can be had (``state()`` says why)."""
        if self._try_aot() is not None or self.jit_part is None:
            return self._module
        if self._module is None and self.build_error is None:
            self._module = self._load_cached()
            if self._module is None and self.build_error is None \
                    and self._jit_missing() is None:
                self._module = self._jit_build()
            self._first_use = self._module is not None
        return self._module

    def state(self) -> BuildState:
        """Built, buildable on first use, or missing and why; builds nothing."""
        if self._try_aot() is not None:
            return BuildState(BUILT, f"{'on first use' if self._first_use else 'ahead of time'} "
                                     f"({self.origin})")
        if self.jit_part is not None and self.build_error is None \
                and self._cached_library() is not None:
            return BuildState(BUILT, f"on first use, cached ({self._cached_library()})")
        why = self.build_error or self._jit_missing()
        if why is None:
            return BuildState(BUILDABLE, f"from {self._sources()[0].parent} into "
                                         f"{self.build_dir()}")
        return BuildState(MISSING, f"{self.name} could not be imported ({self.error}) and {why}")


def cast_rows(inv_temp: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``inv_temp`` in the dtype the kernels compute in (the anchors'), contiguous."""
    return None if inv_temp is None else inv_temp.to(like.dtype).contiguous()
