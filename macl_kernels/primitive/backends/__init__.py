"""Backend registry and selection.

``"reference"`` is the full-matrix oracle of ``macl_kernels/reference.py`` (no primitive: the
losses call it whole). Every other name is a kernel backend: a ``Backend`` instance
(``primitive/protocol.py``) that ``primitive/ops.py`` wraps as custom operators, one module each
in this package, imported lazily (a missing toolchain must not break ``import macl_kernels``),
each declaring what it computes as ``Capabilities``. ``not_supported_reasons`` is the one answer
to "can this backend serve this call". See ``docs/design.md`` for the protocol and how to add a
backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from ..protocol import (ENVIRONMENT, Backend, Capabilities, Options, Reason,
                        missing_build)
from ._native import BUILDABLE, BuildState
# The first-use build's switch, toolchain and cache (``macl-kernels info`` prints them).
from ._native import cache_root, compiler, jit_enabled, ninja  # noqa: F401

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


def _import_reason(name: str) -> Reason:
    return Reason(_IMPORT_ERRORS[name], ENVIRONMENT)


def _compute_dtype(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype the kernels compute in for inputs of ``dtype``: the losses upcast float16 /
    bfloat16 to float32 (and pass the half dtype as the operand dtype)."""
    return torch.float32 if dtype in _HALF else dtype


_HALF = (torch.float16, torch.bfloat16)


def not_supported_reasons(name: str, device: Optional[torch.device] = None,
                          dtype: Optional[torch.dtype] = None, D: Optional[int] = None,
                          options: Optional[Options] = None) -> List[Reason]:
    """Why backend ``name`` cannot serve a call on ``device`` with inputs of ``dtype`` (the
    user's: float16 / bfloat16 count as their float32 compute dtype), width ``D`` and
    ``options``: ``[]`` when it can; ``None`` arguments are not checked. The one answer that
    ``auto``, an explicit backend, ``available_backends``, ``macl-kernels info`` and the kernel
    inventory use (``Backend.not_supported_reasons`` on the backend's ``Capabilities``).
    ``"reference"`` (the dense oracle) serves everything."""
    if name == "reference":
        return []
    try:
        impl = kernel_backend(name)
    except RuntimeError:
        return [_import_reason(name)]
    if dtype in _HALF:  # upcast by the losses; a kernel may still read half operands
        options = dataclasses.replace(options or Options(), operand_dtype=dtype)
    return impl.not_supported_reasons(device, _compute_dtype(dtype), D, options)


def _reason(name: str, device: Optional[torch.device]) -> Optional[str]:
    reasons = not_supported_reasons(name, device)
    return "; ".join(reasons) if reasons else None


def available_backends(device=None) -> Dict[str, Optional[str]]:
    """Map every backend name to ``None`` when usable here (for ``device``, if given) or to a
    sentence saying why not and what to do."""
    if device is not None:
        device = torch.device(device)
    return {name: _reason(name, device) for name in BACKEND_NAMES}


def capabilities(name: str) -> Optional[Capabilities]:
    """Backend ``name``'s ``Capabilities`` (``None`` for ``"reference"`` or a backend whose
    module does not import)."""
    if name not in KERNEL_MODULES:
        return None
    try:
        return kernel_backend(name).capabilities
    except RuntimeError:
        return None


def build_state(name: str) -> Optional[BuildState]:
    """A native backend's build state (built / buildable on first use / missing, and why);
    ``None`` for a backend with nothing compiled."""
    try:
        impl = kernel_backend(name) if name in KERNEL_MODULES else None
    except RuntimeError:
        return None
    return None if impl is None or impl.extension is None else impl.extension.state()


def resolve_backend(backend: str, device: torch.device, dim: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend for ``backend`` on ``device`` (and embeddings of width ``dim`` and
    dtype ``dtype``, when given: ``auto`` passes over a backend whose kernels cap the width or,
    for that dtype, would spill or not fit the GPU). An explicit backend that cannot serve the
    call raises with its reasons: ``RuntimeError`` for the environment, ``TypeError`` for the
    dtype, ``ValueError`` for the width. A native backend that is buildable on first use is
    built here, when first chosen."""
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {['auto', *BACKEND_NAMES]}, got {backend!r}")
    name, error, unbuilt = _resolve(backend, device.type, device.index, dim, dtype)
    if unbuilt:
        _warn_unbuilt(unbuilt, name)
    if error is not None:
        raise _ERRORS[error[0]](error[1])
    return name


_ERRORS = {"RuntimeError": RuntimeError, "TypeError": TypeError, "ValueError": ValueError}
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


def _serving_reasons(name: str, device: torch.device, dim: Optional[int],
                     dtype: Optional[torch.dtype]) -> List[Reason]:
    """``not_supported_reasons``, then, when none is left and the backend's extension is only
    buildable, the first-use build (its failure is the reason)."""
    reasons = not_supported_reasons(name, device, dtype, dim)
    if reasons or name not in KERNEL_MODULES:
        return reasons
    impl = kernel_backend(name)
    extension = impl.extension
    if extension is not None and extension.state().status == BUILDABLE:
        extension.get()  # build now, once, outside any kernel call
        env = impl.environment_reason(device)
        if env is not None:
            reasons = [env]
    return reasons


# Evaluated once per (backend, device, width) at trace time under torch.compile: the answer is a
# constant of the environment, and the probing (imports, CUDA queries, a first-use build) must
# not enter a graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, device_index: Optional[int], dim: Optional[int],
             dtype: Optional[torch.dtype] = None):
    """``(name, error, unbuilt)``: ``error`` is ``(exception name, message)`` or ``None``;
    ``unbuilt`` lists the native backends ``auto`` passed over because their extension was not
    built (for the warning, outside the traced region)."""
    device = torch.device(device_type, device_index) if device_index is not None else \
        torch.device(device_type)
    if backend == "auto":
        rejected, unbuilt = [], []
        for name in AUTO_ORDER.get(device.type, AUTO_ORDER_OTHER):
            reasons = _serving_reasons(name, device, dim, dtype)
            if not reasons:
                return name, None, tuple(unbuilt)
            rejected.append(f"{name}: {'; '.join(reasons)}")
            if missing_build(reasons):
                unbuilt.append((name, "; ".join(reasons)))
        # unreachable while "torch" is last in every order
        return (None, ("RuntimeError", f"no backend can run on {device}: " + "; ".join(rejected)),
                tuple(unbuilt))
    reasons = _serving_reasons(backend, device, dim, dtype)
    if reasons:
        return (None, (reasons[0].error.__name__,
                       f"backend={backend!r} is not usable on {device}: {'; '.join(reasons)}"), ())
    return backend, None, ()
