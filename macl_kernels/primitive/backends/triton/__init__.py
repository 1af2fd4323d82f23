"""Backend ``"triton"``: the shared primitive as fused Triton kernels (GPU, or Triton's CPU
interpreter with ``TRITON_INTERPRET=1``). The math: ``docs/math.md#the-primitive``, the names:
the glossary of ``docs/design.md``.

One module per layer, as FlashAttention keeps kernel bodies, launch code and binding apart:

* ``config.py``: whether Triton imports and in which mode its kernels are decorated, the
  switches (``AUTOTUNE``, ``USE_SYMMETRY``, the interpreter's blocks; set them on this module,
  ``config.AUTOTUNE = False``: every layer reads them from it at call time), the precision
  classes (``PRECISIONS``) and the measured GPU shape tables (``SHAPES``) with their rules;
* ``kernels.py``: the ``@triton.jit`` kernels and their jit helpers (passes, GEMM counts,
  precision);
* ``launch.py``: the one table of kernels (``KERNELS``, ``register_kernel``, ``KernelSpec``),
  the autotuner and the launcher;
* ``backend.py``: the glue from a ``Problem`` to the launches, ``TritonBackend`` and
  ``BACKEND``.

This package's public names are what the registry (``BACKEND``) and the tools (the kernel
inventory, ``macl-kernels kernels``) use.
"""

from __future__ import annotations

from .backend import BACKEND, TritonBackend
from .config import (
    H100_SHARED_MEMORY, INTERPRET, MAX_D, PRECISIONS, SHAPES, SHARED_MEMORY_LIMIT, block_d_of,
    device_shared_limit, max_block_d, measured_shared_memory, precision_class, shape_candidates,
    unavailable_reason,
)
from .launch import (
    KERNELS, KernelSpec, NoFittingShape, TritonResourceError, launch_shape, register_kernel,
)

__all__ = [
    "BACKEND", "TritonBackend", "H100_SHARED_MEMORY", "INTERPRET", "MAX_D", "PRECISIONS",
    "SHAPES", "SHARED_MEMORY_LIMIT", "block_d_of", "device_shared_limit", "max_block_d",
    "measured_shared_memory", "precision_class", "shape_candidates", "unavailable_reason",
    "KERNELS", "KernelSpec", "NoFittingShape", "TritonResourceError", "launch_shape",
    "register_kernel",
]
