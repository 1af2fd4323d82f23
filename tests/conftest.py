"""Shared helpers for the macl_kernels test suite.

Test modules import the plain helpers with ``from conftest import ...`` (pytest puts ``tests/`` on
``sys.path``); the fixtures wrap the same helpers.

The loss cases, layouts, dtypes and tolerances are NOT declared here: they come from the one
registry ``macl_kernels/tools/cases.py`` (the tolerances and their reasons:
docs/math.md#tolerances). This file adds the test-only pieces: seeded inputs, a fixed upstream
gradient, the dense oracle of the primitive (docs/math.md#the-primitive) and the list of kernel
backends usable on this machine.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence, Tuple

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads this when a kernel is
# decorated, so it must be set before macl_kernels' Triton module is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import macl_kernels as mk  # noqa: E402
from macl_kernels.tools.cases import (  # noqa: E402
    CLIP_SCALE, DTYPES, LOSS_CASES, LOSS_LAYOUTS, TOLERANCES, num_anchors, relative_error,
    tolerance,
)
from macl_kernels.primitive.protocol import LogitMap  # noqa: E402
from macl_kernels._validate import LAYOUTS, REDUCTIONS  # noqa: E402


def pytest_configure(config):
    # Also registered in the project configuration; repeated here so that `-m "not slow"` works
    # (and --strict-markers accepts it) whatever that file says.
    config.addinivalue_line(
        "markers", "slow: subprocess-heavy tests (compilers, torchrun, example scripts, CLI "
                   "workers); `make test-fast` deselects them")


F64_RTOL = TOLERANCES["float64"]  # float64 backend vs float64 reference ("to float64 rounding")
F32_RTOL = TOLERANCES["float32"]  # float32 inputs vs float64 reference
HALF_RTOL = TOLERANCES["bfloat16"]  # bfloat16 / float16 inputs vs float64 reference
assert TOLERANCES["float16"] == HALF_RTOL

COMPUTE_BACKENDS = ("reference", "torch", "cpu")  # every backend that runs on CPU tensors in CI
# Every loss that takes a layout (all but CLIP, whose one layout is cross_sym).
LAYOUT_LOSSES = [name for name, case in LOSS_CASES.items() if not case.uses_logit_scale]

HAS_CUDA = torch.cuda.is_available()
# Where the device kernels (triton, cuda) run: the GPU if there is one, else the CPU (Triton's
# interpreter).
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def kernel_backends() -> Tuple[str, ...]:
    """The kernel backends to test on this machine: torch and cpu always (a missing cpu extension
    is a failure, not a skip), triton when it is usable on ``DEVICE`` (its interpreter without a
    GPU), cuda when there is a GPU (a missing extension is then a failure)."""
    names = ["torch", "cpu"]
    if mk.available_backends(DEVICE)["triton"] is None:
        names.append("triton")
    if HAS_CUDA:
        names.append("cuda")
    return tuple(names)


KERNEL_BACKENDS = kernel_backends()


# Without a GPU, Triton's kernels run in its interpreter, every tile program a Python-level loop:
# seconds per loss-level test. Loss-level suites mark those runs slow (`make test` runs them,
# `make test-fast` not); the primitive's own suite (test_primitive.py) runs them fast.
INTERPRETED = () if HAS_CUDA else ("triton",)


def heavy_on_interpreter(backends: Sequence[str]):
    """``backends`` as ``parametrize`` values, the interpreted ones (Triton without a GPU) marked
    ``slow``."""
    return [pytest.param(b, marks=pytest.mark.slow) if b in INTERPRETED else b for b in backends]


def backend_device(backend: str) -> torch.device:
    """Where ``backend``'s kernels run here."""
    return DEVICE if backend in ("triton", "cuda") else torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (the absolute ``||a - b||`` when ``b == 0``)."""
    return relative_error(a, b)


def assert_rel_close(a, b, tol: float, what: str = "") -> None:
    err = rel_err(a, b)
    assert math.isfinite(err) and err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def make_pair(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64,
              scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two correlated random views ``[n, d]`` (positives somewhat aligned, as after training)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    z1 = base + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = base + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (scale * z1).to(dtype), (scale * z2).to(dtype)


def upstream_like(loss: torch.Tensor, seed: int = 1234) -> torch.Tensor:
    """A fixed random upstream gradient of ``loss``'s shape: the same for every backend and,
    being rounded to bfloat16 first, exactly the same numbers in every floating dtype."""
    g = torch.Generator().manual_seed(seed + 7919 * loss.numel())
    up = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(torch.bfloat16)
    return up.to(device=loss.device, dtype=loss.dtype)


def loss_and_grads(fn: Callable, z1: torch.Tensor, z2: torch.Tensor, *,
                   logit_scale: Optional[torch.Tensor] = None, seed: int = 1234,
                   **kwargs) -> Tuple[torch.Tensor, ...]:
    """Run ``fn(z1, z2, **kwargs)`` on fresh leaf copies and back-propagate a fixed random
    upstream gradient. Returns ``(loss, dz1, dz2)`` or, when ``logit_scale`` is a tensor,
    ``(loss, dz1, dz2, dlogit_scale)`` (it is passed as ``logit_scale=`` and gets grad)."""
    leaves = [z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)]
    if logit_scale is not None:
        if isinstance(logit_scale, torch.Tensor):
            ls = logit_scale.detach().clone().requires_grad_(True)
            leaves.append(ls)
            kwargs["logit_scale"] = ls
        else:
            kwargs["logit_scale"] = logit_scale
    loss = fn(leaves[0], leaves[1], **kwargs)
    grads = torch.autograd.grad(loss, leaves, upstream_like(loss, seed))
    return (loss.detach(), *grads)


def assert_same_results(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], tol: float,
                        names: Sequence[str] = ("loss", "dz1", "dz2", "dlogit_scale")) -> None:
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert_rel_close(a, b, tol, name)


def dense_negative_lse(anchors, candidates, inv_temp, pos_index, self_index,
                       logit_map=LogitMap.SCALED, artanh_scale=0.0, artanh_eps=0.0,
                       anchor_labels=None, candidate_labels=None):
    """The primitive every kernel backend implements (docs/math.md#the-primitive), as a full
    matrix by autograd: the independent oracle of ``macl_kernels.primitive.ops.negative_lse``, with the
    same arguments (``candidates=None``: the candidates are the anchors; labels: same-label
    candidates are not negatives)."""
    if candidates is None:
        candidates = anchors
        candidate_labels = anchor_labels
    S = anchors @ candidates.T
    if LogitMap(logit_map) is LogitMap.SCALED:
        logits = S * inv_temp[:, None]
    else:
        logits = artanh_scale * torch.atanh(S.clamp(-1 + artanh_eps, 1 - artanh_eps))
    rows = torch.arange(S.shape[0], device=S.device)
    excluded = torch.zeros_like(S, dtype=torch.bool)
    has_positive = pos_index >= 0  # -1: no positive among the candidates
    excluded[rows[has_positive], pos_index[has_positive]] = True
    if self_index is not None:
        excluded[rows, self_index] = True
    if anchor_labels is not None:
        excluded |= anchor_labels[:, None] == candidate_labels[None, :]
    return torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)


def loss_case(name: str, layout: str = "2n"):
    """``(fn, kwargs)`` of the registry's loss case ``name`` (``macl_kernels.tools.cases``);
    ``layout`` is added for every loss except CLIP, which gets the registry's logit scale."""
    case = LOSS_CASES[name]
    kw = dict(case.kwargs)
    if case.uses_logit_scale:
        kw["logit_scale"] = CLIP_SCALE
    else:
        kw["layout"] = layout
    return case.fn, kw


@pytest.fixture
def pair():
    """A seeded random float64 pair of views, ``[6, 5]``."""
    return make_pair(6, 5, seed=0)


@pytest.fixture
def pair_factory():
    """``pair_factory(n, d, seed=0, dtype=float64)`` -> seeded random views."""
    return make_pair


@pytest.fixture
def hand_case():
    """The hand case of docs/math.md#tolerances in float64."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.8, 0.6], [0.6, 0.8]], dtype=torch.float64)
    return z1, z2


__all__ = [
    "F64_RTOL", "F32_RTOL", "HALF_RTOL", "COMPUTE_BACKENDS", "KERNEL_BACKENDS", "DEVICE",
    "HAS_CUDA", "INTERPRETED", "heavy_on_interpreter", "LAYOUTS", "REDUCTIONS", "DTYPES", "TOLERANCES", "tolerance", "rel_err",
    "assert_rel_close", "make_pair", "upstream_like", "loss_and_grads", "assert_same_results",
    "dense_negative_lse", "backend_device", "LOSS_CASES", "LAYOUT_LOSSES", "LOSS_LAYOUTS",
    "loss_case", "num_anchors", "LogitMap",
]
