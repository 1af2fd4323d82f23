"""The loss math of the fast path (``functional.py``, ``supervised.py``, ``sogclr.py`` and their
shared ``_assembly.py``): the per-row formulas around the primitive.

Kept apart from ``reference.py`` on purpose: the reference is the oracle every backend is tested
against, so it keeps its own, naive implementations, imports nothing from the package, and the
fast path uses none of its helpers (only its losses, as ``backend="reference"``): a bug in a
shared helper would pass every backend-vs-reference test. Formulas: ``docs/math.md``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .primitive import autocast_off  # noqa: F401  (the losses' guard; the primitive owns it)

NORMALIZE_EPS = 1e-12  # u = z / max(||z||, eps), F.normalize's default
# MACL's tau(A) is clamped at min(MACL_TEMPERATURE_FLOOR, temperature): never zero, never a sign
# flip (docs/math.md#macl).
MACL_TEMPERATURE_FLOOR = 1e-3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses compute in float32, or float64 for float64 inputs (half inputs are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _RowNormalize(torch.autograd.Function):
    """``F.normalize(z, dim=1, eps=NORMALIZE_EPS)`` with a fused backward
    (docs/math.md#reductions-and-normalisation). The forward is F.normalize's own operations (the
    same bits); the backward is its closed form, ``dz = (du - u (u . du)) / max(||z||, eps)`` with the
    ``u (u . du)`` term dropped on rows where the clamp is active (``||z|| < eps``), in three
    operations on ``[N, D]`` where autograd's chain through the division, the expand and the norm
    takes about ten; measured on the CPU at N = 4096, D = 128 that was ~14 of a CLIP step's
    ~185 ms. Saves the output ``u`` (which the loss keeps alive anyway) and the ``[N, 1]`` norms."""

    @staticmethod
    def forward(z):
        norm = torch.linalg.vector_norm(z, ord=2, dim=1, keepdim=True)
        denom = norm.clamp_min(NORMALIZE_EPS)
        return z / denom, norm, denom

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, norm, denom = output
        ctx.mark_non_differentiable(norm, denom)
        ctx.save_for_backward(u, norm, denom)

    @staticmethod
    @once_differentiable  # like the primitive's backward: a second derivative raises, clearly
    def backward(ctx, du, _norm_grad, _denom_grad):
        u, norm, denom = ctx.saved_tensors
        if du is None:
            return None
        # Autograd runs this under whatever autocast region backward() was called in (autocast
        # would round vecdot to half precision); autograd's own nodes for F.normalize are not
        # autocast, so neither is this.
        with autocast_off(u.device.type):
            du = du.to(u.dtype)
            # u . du per row; 0 where the clamp holds the denominator constant (no norm gradient)
            along = torch.where(norm >= NORMALIZE_EPS,
                                torch.linalg.vecdot(u, du, dim=1).unsqueeze(1),
                                torch.zeros_like(norm))
            return torch.addcmul(du, u, along, value=-1.0).div_(denom)


def normalize(z: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """Rows in the compute dtype, L2-normalised when ``enabled`` (``F.normalize(z, dim=1)``'s
    values, with a fused backward: ``_RowNormalize``)."""
    z = z.to(compute_dtype(z.dtype))
    if not enabled:
        return z
    if z.dim() != 2 or not torch.is_grad_enabled() or not z.requires_grad:
        return F.normalize(z, p=2.0, dim=1, eps=NORMALIZE_EPS)
    return _RowNormalize.apply(z)[0]


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^x)`` to full precision at every ``x`` (``F.softplus`` switches to ``x`` above
    20, an error of ``e^-20`` that float64 comparisons would see); its gradient is
    ``sigmoid(x)`` exactly, which MACL's reweighting relies on."""
    return torch.logaddexp(x, torch.zeros_like(x))


def macl_value(x: torch.Tensor) -> torch.Tensor:
    """MACL's per-anchor value ``(1 + e^-x) softplus(x)`` (``= sg(V) (-log P_ap)``) without
    overflow: for ``x < 0`` it is ``softplus(x) + log1p(t) / t`` with ``t = e^x`` (-> 1 as
    ``t -> 0``, where ``P_ap`` rounds to 1)."""
    t = torch.exp(torch.clamp(x, max=0.0))
    ratio = torch.where(t > 0, torch.log1p(t) / t, torch.ones_like(t))
    return torch.where(x < 0, softplus(x) + ratio, softplus(x) * (1 + torch.exp(-x)))


def macl_temperature(alignment: torch.Tensor, temperature: float, alpha: float, a0: float,
                     schedule: str) -> torch.Tensor:
    """MACL's model-aware temperature: ``temperature * (1 + alpha (A - a0))`` (``"linear"``) or
    ``temperature * alpha ** A`` (``"exp"``), clamped below at the floor."""
    if schedule == "linear":
        tau = temperature * (1 + alpha * (alignment - a0))
    elif schedule == "exp":
        base = torch.as_tensor(alpha, dtype=alignment.dtype, device=alignment.device)
        tau = temperature * torch.pow(base, alignment)
    else:
        raise ValueError(f"schedule must be one of ['linear', 'exp'], got {schedule!r}")
    return tau.clamp_min(min(MACL_TEMPERATURE_FLOOR, temperature))


def dclw_weights(alignment: torch.Tensor, sigma: float) -> torch.Tensor:
    """DCLW's ``w_i = 2 - N softmax_i(alignment_i / sigma)`` over the (global) batch of
    positive-pair similarities ``alignment`` (detached: no gradient flows through ``w``)."""
    return 2 - alignment.numel() * torch.softmax(alignment.detach() / sigma, dim=0)


def per_anchor_rows(values_per_pair: torch.Tensor, layout: str) -> torch.Tensor:
    """Pair ``i``'s value for every anchor row of ``layout`` (``2n`` and ``cross_sym`` hold each
    pair twice: the ``N`` first-view rows, then the ``N`` second-view rows)."""
    return values_per_pair if layout == "cross" else values_per_pair.repeat(2)


def reduce(per_anchor: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """``"mean"`` / ``"sum"`` / ``"none"`` over the anchors, returned in the inputs' dtype."""
    if reduction == "mean":
        return per_anchor.mean().to(dtype)
    if reduction == "sum":
        return per_anchor.sum().to(dtype)
    if reduction == "none":
        return per_anchor.to(dtype)
    raise ValueError(f"reduction must be one of ['mean', 'sum', 'none'], got {reduction!r}")
