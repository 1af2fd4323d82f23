"""The primitive wing: the one reduction every loss is built on, and the backends that compute it.

``lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)`` (or SigLIP's softplus sum) and its backward,
computed tile by tile by a kernel backend (docs/design.md, "One primitive, many losses"). This
``__init__`` is the wing's public surface: the library (losses, modules, ...) and the tools import
from here or from a public module of this package (``protocol``, ``ops``, ``backends``), never a
private name (``tests/test_wings.py``).
"""

from .protocol import (Backend, Capabilities, Grads, LogitMap, Needs, Options,  # noqa: F401
                       Problem, Reason, RowReduction, autocast_off)
from .ops import negative_lse, negative_lse_backward_op, negative_lse_op  # noqa: F401
from .backends import (AUTO_ORDER, BACKEND_NAMES, available_backends,  # noqa: F401
                       kernel_backend, not_supported_reasons, resolve_backend)

__all__ = [
    "Backend", "Capabilities", "Grads", "LogitMap", "Needs", "Options", "Problem", "Reason",
    "RowReduction", "autocast_off",
    "negative_lse", "negative_lse_op", "negative_lse_backward_op",
    "AUTO_ORDER", "BACKEND_NAMES", "available_backends", "kernel_backend", "not_supported_reasons",
    "resolve_backend",
]
