"""Backend registry and dispatch.

Every backend except ``"reference"`` implements the one primitive the losses of ``functional.py`` are built from
(``negative_lse`` with its backward); ``"reference"`` runs the full-matrix oracle of
``macl_kernels.reference`` instead. A backend that cannot run says why, and ``"auto"`` says why
each candidate was rejected when none fits.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import torch

BACKEND_NAMES = ("reference", "torch", "triton", "cpu", "cuda")

# "auto" tries these in order, per device type: fastest first, "torch" as the universal fallback.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
AUTO_ORDER_OTHER = ("torch",)


# Each kernel backend lives in its own module of this package, imported lazily (a missing
# toolchain must not break ``import macl_kernels``). A module exposes
# ``unavailable_reason(device) -> Optional[str]`` and the primitive ``negative_lse``.
_KERNEL_MODULES = {"triton": "triton_fused", "cpu": "cpu", "cuda": "cuda"}


def _kernel_module(name: str):
    return importlib.import_module(f"{__name__}.{_KERNEL_MODULES[name]}")


def _kernel_reason(name: str):
    def reason(device: Optional[torch.device]) -> Optional[str]:
        try:
            module = _kernel_module(name)
        except ImportError as exc:  # the backend's Python side failed to import
            return f"its module could not be imported ({type(exc).__name__}: {exc})"
        return module.unavailable_reason(device)

    return reason


def _always(device: Optional[torch.device]) -> Optional[str]:
    return None


_REASONS: Dict[str, Callable[[Optional[torch.device]], Optional[str]]] = {
    "reference": _always,
    "torch": _always,
    "triton": _kernel_reason("triton"),
    "cpu": _kernel_reason("cpu"),
    "cuda": _kernel_reason("cuda"),
}


def available_backends(device=None) -> Dict[str, Optional[str]]:
    """Map every backend name to ``None`` when usable here (for ``device``, if given) or to a
    sentence saying why not and what to install."""
    if device is not None:
        device = torch.device(device)
    return {name: _REASONS[name](device) for name in BACKEND_NAMES}


def resolve_backend(backend: str, device: torch.device, dim: Optional[int] = None) -> str:
    """The concrete backend for ``backend`` on ``device`` (and embeddings of width ``dim``, when
    given: ``auto`` passes over a backend whose kernels cap the width); raises ``RuntimeError``
    if unusable."""
    if backend != "auto" and backend not in _REASONS:
        raise ValueError(f"backend must be one of {['auto', *BACKEND_NAMES]}, got {backend!r}")
    name, error = _resolve(backend, device.type, device.index, dim)
    if error is not None:
        raise RuntimeError(error)
    return name


def _width_reason(name: str, dim: Optional[int]) -> Optional[str]:
    """A kernel module may cap the embedding width (``MAX_D``); explicit requests beyond it get
    the backend's own ``ValueError``, ``auto`` moves on to the next backend."""
    max_d = getattr(primitive(name), "MAX_D", None) if name in _KERNEL_MODULES else None
    if dim is not None and max_d is not None and dim > max_d:
        return f"supports D <= {max_d}, got D = {dim}"
    return None


# Evaluated once per (backend, device, width) at trace time under torch.compile: the answer is a
# constant of the environment, and the probing (imports, CUDA queries) must not enter a graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, device_index: Optional[int], dim: Optional[int]):
    device = torch.device(device_type, device_index) if device_index is not None else \
        torch.device(device_type)
    if backend == "auto":
        rejected = []
        for name in AUTO_ORDER.get(device.type, AUTO_ORDER_OTHER):
            reason = _REASONS[name](device) or _width_reason(name, dim)
            if reason is None:
                return name, None
            rejected.append(f"{name}: {reason}")
        # unreachable while "torch" is last in every order
        return None, f"no backend can run on {device}: " + "; ".join(rejected)
    reason = _REASONS[backend](device)
    if reason is not None:
        return None, f"backend={backend!r} is not usable on {device}: {reason}"
    return backend, None


@torch.compiler.assume_constant_result
def has_op_protocol(name: str) -> bool:
    """Whether backend ``name`` exposes the ``fwd``/``bwd`` pair that ``macl_kernels/_ops.py``
    wraps as custom ops (and so compiles without a graph break)."""
    module = primitive(name)
    return hasattr(module, "fwd") and hasattr(module, "bwd")


def primitive(name: str):
    """The module implementing ``negative_lse`` for backend ``name``."""
    if name == "torch":
        from . import torch_chunked

        return torch_chunked
    if name in _KERNEL_MODULES:
        return _kernel_module(name)
    raise RuntimeError(f"backend {name!r} has no primitive implementation")  # pragma: no cover
