"""Build macl-kernels (metadata lives in pyproject.toml): the Python package, the C++/CUDA sources
it ships, and, when built against an installed torch, the compiled extensions.

Two ways to install, both from this tree (or its sdist):

    pip install .                                  # anywhere: isolated build, no compiler needed
    pip install torch==2.13.0                      # or any torch >= 2.4, then ahead of time:
    pip install --no-build-isolation -e .          # (make install does this inside .venv)
    pip install --no-build-isolation .             # non-editable

A plain ``pip install .`` (or ``python -m build``, or an sdist installed by pip) builds in a
throw-away environment that has no torch (torch is deliberately not a build requirement: pip would
fetch an unpinned, multi-GB torch into it, and an extension compiled against that one would not
load under the user's torch). There this script builds the pure-Python package WITHOUT the
ahead-of-time extensions and says so in one note; the wheel is ``py3-none-any``. It carries the
C++ sources (``csrc/`` of this tree, installed as ``macl_kernels/csrc/``), from which backend
"cpu" is compiled on first use against the torch that imports it (torch's cpp_extension, cached
per torch version; ``macl-kernels info`` says whether it is built, buildable on first use, or
missing and why). Backends "reference", "torch" and "triton" need no compiled code.

With torch importable and no build isolation (``--no-build-isolation``, ``make install``) it
builds, as torch extensions, exactly as before:

- ``macl_kernels._C_cpu`` (csrc/cpu/*.cpp, the fused C++/OpenMP kernels of backend "cpu"):
  ALWAYS. If the compile fails, the build fails (it never falls back silently to a pure-Python
  install: the user asked for the ahead-of-time build).
- ``macl_kernels._C_cuda`` (csrc/cuda, backend "cuda"): when this torch is a CUDA build and nvcc is
  found (CUDA_HOME); otherwise skipped with a note, and ``available_backends()`` says why.

The build uses ninja (parallel compiles, incremental rebuilds) when a ``ninja`` executable is found
(on PATH, or the ``ninja`` pip package in this environment: requirements-dev.txt pins it);
otherwise setuptools' serial compiler, with ``MAX_JOBS`` extensions built at once.

Environment variables:

``MACL_SKIP_CPU_EXTENSION=1``
    Explicit opt-out: build the pure-Python package without the ahead-of-time extensions even
    where torch is importable (backend "cpu" is then compiled on first use, as in an isolated
    build).
``MACL_SKIP_CUDA_EXTENSION=1``
    Do not build ``_C_cuda`` even when a CUDA torch and nvcc are present.
``MACL_CPU_ARCH_FLAGS``
    Target flags of ``_C_cpu``. Default: ``-mavx2 -mfma`` on x86_64 (portable to any x86_64 CPU
    since ~2013/2015: Haswell, Zen), none on other architectures. ``native`` means
    ``-march=native`` (a few per cent at most, see bench/results/packaging/README.md; the binary
    then only runs on CPUs like the build machine); any other value is used as the flags
    (shell-split); an empty value means no arch flags.
``MACL_CUDA_ARCH_FLAGS``
    nvcc target flags of ``_C_cuda``. Default ``DEFAULT_CUDA_ARCH_FLAGS``: cubins for sm_80
    (A100) and sm_90a (H100/H200), plus compute_90 PTX that the driver JIT-compiles on GPUs
    newer than both (Blackwell, ...). ``macl-kernels info`` lists what the built extension
    carries.
``MAX_JOBS``
    Parallel compile jobs (ninja's -j; without ninja: extensions built at once).
``MACL_USE_NINJA=0``
    Do not use ninja even when it is found (setuptools' serial compiler).
"""

import glob
import os
import platform
import shlex
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Every C++ file of csrc/cpu (kernels and binding), relative to this directory as setuptools wants.
CPU_SOURCES = sorted(os.path.relpath(p, HERE)
                     for p in glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
CUDA_SOURCES = ["csrc/cuda/macl_cuda.cu", "csrc/cuda/binding.cpp"]

# The C++/CUDA sources travel in the wheel as package data: the top-level csrc/ is installed as
# macl_kernels/csrc/ (backend "cpu" is compiled from it on first use where no extension was built
# ahead of time). Globs, so that new source files are shipped without touching this list.
SOURCE_PACKAGE = "macl_kernels.csrc"
SOURCE_PATTERNS = ["cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.cpp", "cuda/*.h"]

AHEAD_OF_TIME_HINT = "pip install --no-build-isolation .  (torch installed first; or make install)"


def note(msg: str) -> None:
    print(f"macl-kernels setup.py: {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> "NoReturn":  # noqa: F821
    # SystemExit with a string: printed on stderr, exit status 1; pip shows it under
    # "... did not run successfully".
    raise SystemExit(f"\nmacl-kernels: {msg}\n")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def in_isolated_build_env() -> bool:
    """True inside pip's (or build's / uv's) isolated build environment.

    pip puts its overlay at .../pip-build-env-XXXX/{overlay,normal} on sys.path; ``python -m build``
    and uv build in a fresh temporary venv whose prefix names it. Both normally lack torch; should
    one have it, it is still not the torch that will import the extension, so no extension is
    built there either.
    """
    markers = ("pip-build-env-", "build-env-", "builds-v")
    return any(m in p for p in sys.path + [sys.prefix] for m in markers if p)


# sm_90a cubins use Hopper-only features and run on sm_90 only, so the portable PTX is
# compute_90 (not 90a): any later GPU's driver can compile it.
DEFAULT_CUDA_ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80 "
                           "-gencode=arch=compute_90a,code=sm_90a "
                           "-gencode=arch=compute_90,code=compute_90")


def cpu_arch_flags() -> list:
    value = os.environ.get("MACL_CPU_ARCH_FLAGS")
    if value is not None:
        value = value.strip()
        return ["-march=native"] if value == "native" else shlex.split(value)
    if platform.machine().lower() in ("x86_64", "amd64", "x64"):
        return ["-mavx2", "-mfma"]
    return []  # aarch64, ppc64le, ...: the compiler's default target


def put_ninja_on_path() -> None:
    """--no-build-isolation runs the backend with this venv's python but the caller's PATH: make
    the ``ninja`` pip package's executable (and the venv's bin/) findable by torch's builder."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the pip package

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


def import_torch():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return None, None, e
    return torch, cpp_extension, None


def pure_python(why: str):
    """No ahead-of-time extensions: one note saying why and what happens instead."""
    note(f"{why}: building the pure-Python package WITHOUT the ahead-of-time extensions. "
         "Backends 'reference', 'torch' and 'triton' need none; 'cpu' is compiled from the "
         "shipped sources (macl_kernels/csrc) on first use, where a C++ compiler is found "
         "(`macl-kernels info` says). To compile ahead of time instead: " + AHEAD_OF_TIME_HINT)
    return [], {}


def extensions():
    if env_flag("MACL_SKIP_CPU_EXTENSION"):
        return pure_python("MACL_SKIP_CPU_EXTENSION=1")
    # An isolated build (plain `pip install .`, `python -m build`, pip installing an sdist) has
    # no torch, or at best one that is not the torch that will import the extension.
    if in_isolated_build_env():
        return pure_python("isolated build environment (no torch to compile against)")
    torch, cpp_extension, err = import_torch()
    if torch is None:
        return pure_python(f"torch cannot be imported at build time ({type(err).__name__}: {err})")

    put_ninja_on_path()
    BuildExtension = cpp_extension.BuildExtension
    CppExtension = cpp_extension.CppExtension
    use_ninja = os.environ.get("MACL_USE_NINJA", "1").strip() != "0" and \
        cpp_extension.is_ninja_available()
    max_jobs = os.environ.get("MAX_JOBS", "").strip()

    class MaclBuildExt(BuildExtension):
        """torch's BuildExtension: ninja when available, else setuptools' compiler with MAX_JOBS
        extensions at once; a failed compile stops the build with a message saying what to do."""

        def finalize_options(self):
            if not use_ninja and self.parallel is None and max_jobs.isdigit() and int(max_jobs) > 1:
                self.parallel = int(max_jobs)
            super().finalize_options()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # CompileError, LinkError, subprocess errors, ninja's RuntimeError
                which = ("MACL_CPU_ARCH_FLAGS (current: %r; e.g. MACL_CPU_ARCH_FLAGS= for none)"
                         % " ".join(cpu_arch_flags())) if ext.name.endswith("_C_cpu") else \
                    "MACL_CUDA_ARCH_FLAGS, or MACL_SKIP_CUDA_EXTENSION=1 to build without it"
                raise SystemExit(
                    f"\nmacl-kernels: compiling {ext.name} failed ({type(e).__name__}: {e}).\n"
                    "The compiler's own error is printed above. It needs a C++20 compiler "
                    "(g++ >= 10 or clang >= 12) with OpenMP and the headers of the installed "
                    f"torch {torch.__version__}. Check {which}. To install without "
                    "the ahead-of-time extensions (backend 'cpu' compiled on first use "
                    "instead), set MACL_SKIP_CPU_EXTENSION=1.\n") from e

    torch_version = f'-DMACL_BUILT_WITH_TORCH="{torch.__version__}"'
    exts = [
        CppExtension(
            "macl_kernels._C_cpu",
            CPU_SOURCES,
            # -fno-trapping-math lets GCC turn the float selects of the exp/max loops into
            # blends and vectorise them (2.5x on the forward); the kernels never rely on
            # floating-point exceptions. (Not -ffast-math: -inf marks excluded pairs.)
            extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math", "-std=c++20",
                                torch_version, *cpu_arch_flags()],
            extra_link_args=["-fopenmp"],
        )
    ]

    cuda_reason = None
    if env_flag("MACL_SKIP_CUDA_EXTENSION"):
        cuda_reason = "MACL_SKIP_CUDA_EXTENSION=1"
    elif getattr(torch.version, "hip", None):
        cuda_reason = f"torch {torch.__version__} is a ROCm build (backend 'cuda' needs CUDA)"
    elif not torch.version.cuda:
        cuda_reason = f"torch {torch.__version__} is a CPU build"
    elif cpp_extension.CUDA_HOME is None:
        cuda_reason = (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but no "
                       "nvcc was found: install the CUDA toolkit and set CUDA_HOME to build it")
    elif not all(os.path.exists(os.path.join(HERE, s)) for s in CUDA_SOURCES):
        cuda_reason = "the csrc/cuda sources are missing"
    if cuda_reason:
        note(f"not building macl_kernels._C_cuda: {cuda_reason}.")
    else:
        cuda_arch = shlex.split(os.environ.get("MACL_CUDA_ARCH_FLAGS", DEFAULT_CUDA_ARCH_FLAGS))
        exts.append(
            cpp_extension.CUDAExtension(
                "macl_kernels._C_cuda",
                CUDA_SOURCES,
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++20", torch_version],
                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", torch_version, *cuda_arch],
                },
            )
        )
    note(f"building {', '.join(e.name for e in exts)} against torch {torch.__version__} "
         f"(CPU arch flags: {' '.join(cpu_arch_flags()) or 'none'}; "
         + ("ninja" if use_ninja else f"no ninja: serial compiles, MAX_JOBS={max_jobs or 'unset'}")
         + ")")
    return exts, {"build_ext": MaclBuildExt.with_options(use_ninja=use_ninja)}


def check_setuptools() -> None:
    import setuptools

    try:
        major = int(setuptools.__version__.split(".")[0])
    except ValueError:
        return
    if major < 61:  # PEP 621 metadata in pyproject.toml
        fail(f"setuptools {setuptools.__version__} is too old (pyproject.toml metadata needs "
             ">= 61). Run: pip install -U setuptools wheel   and build again.")


check_setuptools()
ext_modules, cmdclass = extensions()

# The license as a plain field (not a PEP 639 expression in pyproject.toml): every setuptools
# >= 61 accepts it. The text is LICENSE (Apache-2.0).
# Packages: macl_kernels and its subpackages from this tree, plus csrc/ mapped to macl_kernels.csrc
# (data only: no Python in it, nothing imports it as a module).
setup(
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["macl_kernels", "macl_kernels.*"]) + [SOURCE_PACKAGE],
    package_dir={SOURCE_PACKAGE: "csrc"},
    package_data={SOURCE_PACKAGE: SOURCE_PATTERNS},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
