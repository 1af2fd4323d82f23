"""Shared helpers for the macl_kernels test suite.

Test modules import the plain helpers with ``from conftest import ...`` (pytest puts ``tests/`` on
``sys.path``); the fixtures wrap the same helpers.

Tolerances come from SPEC.md section 8: float64 backends agree to float64 rounding (we use a
relative error of 1e-10), float32 inputs to 1e-5 and bfloat16/float16 inputs to 2e-2 relative
error against the float64 reference.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads this when a kernel is
# decorated, so it must be set before macl_kernels' Triton module is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import macl_kernels as mk

F64_RTOL = 1e-10  # float64 backend vs float64 reference (SPEC: "to float64 rounding")
F32_RTOL = 1e-5  # float32 inputs vs float64 reference (SPEC section 8)
HALF_RTOL = 2e-2  # bfloat16 / float16 inputs vs float64 reference (SPEC section 8)

COMPUTE_BACKENDS = ("reference", "torch", "cpu")  # every backend that runs on CPU tensors in CI
LAYOUTS = ("2n", "cross", "cross_sym")
REDUCTIONS = ("mean", "sum", "none")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (the absolute ``||a - b||`` when ``b == 0``)."""
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    return diff / ref if ref > 0 else diff


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


def dense_negative_lse(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale,
                       artanh_eps):
    """The primitive every backend implements, as a full matrix by autograd: the independent
    oracle of the backends' ``negative_lse`` (SPEC.md section 6)."""
    S = anchors @ candidates.T
    if artanh_scale is None:
        logits = S * inv_temp[:, None]
    else:
        logits = artanh_scale * torch.atanh(S.clamp(-1 + artanh_eps, 1 - artanh_eps))
    rows = torch.arange(S.shape[0], device=S.device)
    excluded = torch.zeros_like(S, dtype=torch.bool)
    excluded[rows, pos_index] = True
    if self_index is not None:
        excluded[rows, self_index] = True
    return torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)


# Every public loss, as (function, extra keyword arguments, layouts it supports). CLIP has its own
# fixed layout (cross_sym) and takes the scale instead of a temperature.
LOSS_CASES: Dict[str, Tuple[Callable, dict]] = {
    "infonce": (mk.infonce_loss, dict(temperature=0.2)),
    "dcl": (mk.dcl_loss, dict(temperature=0.2)),
    "dclw": (mk.dcl_loss, dict(temperature=0.2, weighted=True)),
    "macl": (mk.macl_loss, dict()),
    "macl_anchor": (mk.macl_loss, dict(temperature_mode="anchor")),
    "macl_exp": (mk.macl_loss, dict(schedule="exp", alpha=2.0)),
    "macl_noreweight": (mk.macl_loss, dict(reweight=False)),
    "tfree": (mk.tfree_loss, dict()),
    "clip": (mk.clip_loss, dict(logit_scale=1 / 0.07)),
}
LAYOUT_LOSSES = [name for name in LOSS_CASES if name != "clip"]
# Every (loss, layout) pair that exists: CLIP only as cross_sym.
LOSS_LAYOUTS = [(name, layout) for name in LAYOUT_LOSSES for layout in LAYOUTS] + [
    ("clip", "cross_sym")]


def loss_case(name: str, layout: str = "2n"):
    """``(fn, kwargs)`` for a loss case; ``layout`` is added for every loss except CLIP."""
    fn, kw = LOSS_CASES[name]
    kw = dict(kw)
    if name != "clip":
        kw["layout"] = layout
    return fn, kw


def num_anchors(n: int, layout: str) -> int:
    return n if layout == "cross" else 2 * n


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
    """SPEC.md section 8's hand case in float64."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.8, 0.6], [0.6, 0.8]], dtype=torch.float64)
    return z1, z2


__all__ = [
    "F64_RTOL", "F32_RTOL", "HALF_RTOL", "COMPUTE_BACKENDS", "LAYOUTS", "REDUCTIONS", "rel_err",
    "assert_rel_close", "make_pair", "upstream_like", "loss_and_grads", "assert_same_results",
    "dense_negative_lse",
    "LOSS_CASES", "LAYOUT_LOSSES", "LOSS_LAYOUTS", "loss_case", "num_anchors",
]
