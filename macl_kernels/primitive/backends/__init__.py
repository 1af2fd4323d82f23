"""Backend registry and selection.

``"reference"`` is the full-matrix oracle of ``macl_kernels/reference.py`` (no primitive: the
losses call it whole). Every other name is a kernel backend: a ``Backend`` instance
(``macl_kernels/_primitive.py``) that ``macl_kernels/_ops.py`` wraps as custom operators, one
module each in this package, imported lazily (a missing toolchain must not break
``import macl_kernels``). See ``docs/design.md`` for the protocol and how to add a backend.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional, Tuple

import torch

from ..protocol import Backend

# The kernel backends and the module (in this package) whose ``BACKEND`` implements each.
KERNEL_MODULES = {"torch": "torch_chunked", "triton": "triton", "cpu": "cpu",
                  "cuda": "cuda"}
BACKEND_NAMES = ("reference", "torch", "triton", "cpu", "cuda")

# "auto" tries these in order, per device type: fastest first, "torch" as the universal fallback.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
AUTO_ORDER_OTHER = ("torch",)

_IMPORT_ERRORS: Dict[str, str] = {}


def kernel_backend(name: str) -> Backend:
    """The ``Backend`` of kernel backend ``name``; ``RuntimeError`` if its module cannot be
    imported (``available_backends`` says why)."""
    if name not in KERNEL_MODULES:
        raise ValueError(f"backend must be one of {list(KERNEL_MODULES)} here, got {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{KERNEL_MODULES[name]}")
    except ImportError as exc:  # the backend's Python side failed to import
        reason = f"its module could not be imported ({type(exc).__name__}: {exc})"
        _IMPORT_ERRORS[name] = reason
        raise RuntimeError(f"backend {name!r} is not usable: {reason}") from exc
    return module.BACKEND


def _reason(name: str, device: Optional[torch.device]) -> Optional[str]:
    if name == "reference":
        return None
    try:
        return kernel_backend(name).unavailable_reason(device)
    except RuntimeError:
        return _IMPORT_ERRORS[name]


def available_backends(device=None) -> Dict[str, Optional[str]]:
    """Map every backend name to ``None`` when usable here (for ``device``, if given) or to a
    sentence saying why not and what to do."""
    if device is not None:
        device = torch.device(device)
    return {name: _reason(name, device) for name in BACKEND_NAMES}


def resolve_backend(backend: str, device: torch.device, dim: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend for ``backend`` on ``device`` (and embeddings of width ``dim`` and
    dtype ``dtype``, when given: ``auto`` passes over a backend whose kernels cap the width or,
    for that dtype, would spill or not fit the GPU). An explicit but unusable backend raises
    ``RuntimeError`` with the reason."""
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {['auto', *BACKEND_NAMES]}, got {backend!r}")
    name, error, unbuilt = _resolve(backend, device.type, device.index, dim, dtype)
    if unbuilt:
        _warn_unbuilt(unbuilt, name)
    if error is not None:
        raise RuntimeError(error)
    return name


_WARNED = set()


def _warn_unbuilt(passed_over: Tuple[Tuple[str, str], ...], chosen: str) -> None:
    """Once per backend and process: ``auto`` ran something slower because a native backend was
    not built - a packaging problem the user should hear about, not a silent slowdown."""
    for name, reason in passed_over:
        if name in _WARNED:
            continue
        _WARNED.add(name)
        warnings.warn(f"backend='auto' passed over the native backend {name!r} and uses "
                      f"{chosen!r} instead: {reason}", RuntimeWarning, stacklevel=4)


def _width_reason(name: str, dim: Optional[int], dtype: Optional[torch.dtype],
                  device: torch.device) -> Optional[str]:
    if name not in KERNEL_MODULES:
        return None
    return kernel_backend(name).width_reason(dim, dtype, device)


# Evaluated once per (backend, device, width) at trace time under torch.compile: the answer is a
# constant of the environment, and the probing (imports, CUDA queries) must not enter a graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, device_index: Optional[int], dim: Optional[int],
             dtype: Optional[torch.dtype] = None):
    """``(name, error, unbuilt)``: ``unbuilt`` lists the native backends ``auto`` passed over
    because their extension was not built (for the warning, outside the traced region)."""
    device = torch.device(device_type, device_index) if device_index is not None else \
        torch.device(device_type)
    if backend == "auto":
        rejected, unbuilt = [], []
        for name in AUTO_ORDER.get(device.type, AUTO_ORDER_OTHER):
            reason = _reason(name, device) or _width_reason(name, dim, dtype, device)
            if reason is None:
                return name, None, tuple(unbuilt)
            rejected.append(f"{name}: {reason}")
            impl = kernel_backend(name) if name not in _IMPORT_ERRORS else None
            if impl is not None and impl.native and impl.missing_build(device):
                unbuilt.append((name, reason))
        # unreachable while "torch" is last in every order
        return None, f"no backend can run on {device}: " + "; ".join(rejected), tuple(unbuilt)
    reason = _reason(backend, device)
    if reason is not None:
        return None, f"backend={backend!r} is not usable on {device}: {reason}", ()
    return backend, None, ()
