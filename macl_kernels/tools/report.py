"""What a report says about where it ran: device and CPU names, versions, the backends usable
here, and plain-text tables. Used by ``info``, ``verify``, ``bench`` and ``profile``."""

from __future__ import annotations

import csv
import os
import platform
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from .. import __version__
from ..primitive import backends as native
from ..primitive.backends import available_backends, build_state, capabilities


def default_device() -> str:
    """The device a user most likely wants to check: the GPU when PyTorch sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), so results say what they ran on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    """Human-readable name of ``device``: the CUDA device name, else the CPU model."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return cpu_model_name()


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]],
                 right_align: Sequence[bool] = ()) -> str:
    """A plain-text table with columns as wide as their widest cell (numbers right-aligned)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    align = list(right_align) + [False] * (len(header) - len(right_align))

    def line(cells):
        return "  ".join(c.rjust(w) if a else c.ljust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def _triton_version() -> str:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "not installed"
    try:
        import triton

        return getattr(triton, "__version__", "installed (version unknown)")
    except Exception as exc:  # a broken install should be reported, not crash `info`
        return f"installed but not importable ({type(exc).__name__}: {exc})"


def _cuobjdump() -> Optional[str]:
    """A ``cuobjdump``: Triton's bundled one, the CUDA toolkit's, or one on PATH."""
    import importlib.util
    import shutil

    candidates = []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)),
                None)


def binary_architectures(path: str) -> Optional[Tuple[List[str], List[str]]]:
    """``(cubin architectures, PTX architectures)`` embedded in a CUDA binary (e.g.
    ``(["sm_80", "sm_90a"], ["compute_90"])``), read with ``cuobjdump --list-elf --list-ptx``;
    ``None`` when no cuobjdump is found or it cannot read the file."""
    import re
    import subprocess

    tool = _cuobjdump()
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--list-elf", "--list-ptx", path], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    elf = sorted(set(re.findall(r"ELF file\s+\d+:.*\.(sm_\w+?)\.cubin", out)))
    ptx = sorted({"compute_" + a for a in re.findall(r"PTX file\s+\d+:.*\.sm_(\w+?)\.ptx", out)})
    if not elf and not ptx:
        return None
    return elf, ptx


def cuda_extension_line() -> str:
    """Which GPU architectures the CUDA extension carries (``info``): its cubins run on those
    architectures, its PTX is compiled by the driver for newer ones."""
    import importlib.util

    spec = importlib.util.find_spec("macl_kernels._C_cuda")
    if spec is None or not spec.origin:
        return "not built"
    archs = binary_architectures(spec.origin)
    if archs is None:
        return f"built ({spec.origin}); architectures unknown (no cuobjdump to read them)"
    elf, ptx = archs
    text = f"cubins {', '.join(elf) or 'none'}"
    if ptx:
        text += f"; PTX {', '.join(ptx)} (JIT-compiled by the driver on newer GPUs)"
    return text


def info_lines() -> List[str]:
    """The ``info`` report, one ``key: value`` line each (a list so that tests can inspect it)."""
    lines = [
        f"macl_kernels: {__version__} ({os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})",
        f"python: {platform.python_version()} ({platform.python_implementation()}, "
        f"{sys.executable})",
        f"platform: {platform.platform()}",
        f"torch: {torch.__version__}",
        f"torch CUDA build: {torch.version.cuda or 'none (CPU-only build)'}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("CUDA device: none visible")
    lines.append(f"triton: {_triton_version()}")
    lines.append(f"cuda extension: {cuda_extension_line()}")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = f"{os.cpu_count()}" + (f" ({affinity} usable by this process)"
                                  if affinity is not None and affinity != os.cpu_count() else "")
    lines.append(f"CPU: {cpu_model_name()}, {cpus} logical CPUs, "
                 f"torch threads {torch.get_num_threads()}")
    lines.append(f"native builds: {native_build_line()}")
    lines.append("backends:")
    lines.extend(backend_lines())
    return lines


_BUILD_WORDS = {"built": "built", "buildable": "buildable on first use", "missing": "missing"}


def native_build_line() -> str:
    """Whether a native backend that was not built ahead of time can be built on first use:
    the switch, the compiler and the cache folder."""
    if not native.jit_enabled():
        return "first-use build disabled (MACL_KERNELS_JIT=0)"
    cxx = native.compiler()
    return (f"first-use build of the cpu extension enabled; C++ compiler "
            f"{cxx or 'none found'}; ninja {native.ninja() or 'none found'}; cache "
            f"{native.cache_root()} (MACL_KERNELS_CACHE); the cuda extension is built ahead of "
            f"time only")


def backend_lines() -> List[str]:
    """Per backend: usable or why not (``not_supported_reasons`` for this machine), what it
    computes (its ``Capabilities``) and, for a native backend, its build state: built (ahead of
    time or a cached first-use build), buildable on first use, or missing and why."""
    lines = []
    for name, reason in available_backends().items():
        lines.append(f"  {name}: {'usable' if reason is None else 'unusable: ' + reason}")
        caps = capabilities(name)
        if caps is None:
            if name == "reference":
                lines.append("    computes: the dense full-matrix oracle of every loss "
                             "(any device, dtype and width)")
            continue
        lines.append(f"    computes: {caps.summary()}")
        state = build_state(name)
        if state is not None:
            lines.append(f"    build: {_BUILD_WORDS[state.status]}: {state.detail}")
    return lines


def write_csv(path: str, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """``rows`` as a CSV with ``columns`` (a missing or ``None`` value as an empty cell)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
