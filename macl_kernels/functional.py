"""The public loss functions.

Every loss is assembled from one primitive (``docs/math.md#the-primitive``): per anchor row ``a``
the similarity to its positive ``S_a,p(a)`` (``O(M * D)``, plain PyTorch) and

    lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak)

computed by the chosen backend tile by tile, never holding ``S``. With
``x_a = lse_neg[a] - l_ap`` every loss is a short formula on per-row vectors:

    InfoNCE, CLIP, temperature-free   -log P_ap = softplus(x_a)
    DCL / DCLW                        lse_neg[a] - w_a l_ap
    MACL                              sg(V_a) * softplus(x_a) = (1 + e^-x_a) softplus(x_a),
                                      whose gradient in x_a is exactly 1 (docs/math.md#macl)

``softplus(x)`` avoids both ``log(softmax)`` underflow and the cancellation in ``1 - P``.
``LSE`` over all candidates, if ever wanted, is ``logaddexp(lse_neg, l_ap)``.

Shapes: ``z1, z2`` are ``[N, D]``; anchors ``M`` = ``2N`` (layout ``"2n"``), ``N``
(``"cross"``) or ``2N`` (``"cross_sym"``: the N row-anchors, then the N column-anchors).
``reduction="none"`` returns the ``M`` per-anchor losses in that order.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

from . import _math, _ops
from . import _validate as V
from . import distributed, reference
from ._math import MACL_TEMPERATURE_FLOOR, compute_dtype, softplus
from ._primitive import LogitMap
from .backends import available_backends, resolve_backend

__all__ = [
    "macl_loss", "infonce_loss", "clip_loss", "dcl_loss", "tfree_loss", "available_backends",
    "MACL_TEMPERATURE_FLOOR",
]


class _Block(NamedTuple):
    """Anchors against candidates; row ``a``'s positive is ``candidates[pos_index[a]]`` and,
    when ``self_index`` is given, ``candidates[self_index[a]]`` is the anchor itself (skipped)."""

    anchors: torch.Tensor
    candidates: torch.Tensor
    pos_index: torch.Tensor
    self_index: Optional[torch.Tensor]


def _blocks(u1: torch.Tensor, u2: torch.Tensor, layout: str, prep_dist=None, gather=None):
    """The anchor/candidate blocks of ``layout``. Distributed: the anchors are the local rows,
    the candidates every rank's rows (``gather``), positives and self offset by ``rank * n``."""
    n = u1.shape[0]
    if prep_dist is None:
        offset, total, u1_all, u2_all = 0, n, u1, u2
    else:
        offset, total = prep_dist.rank * n, prep_dist.world_size * n
        u1_all, u2_all = gather(u1), gather(u2)
    rows = torch.arange(n, device=u1.device) + offset
    if layout == "2n":
        # Local anchors [u1; u2] against all candidates [u1_all; u2_all]. Single process: one
        # tensor for both, S = U U^T is symmetric and a backend may exploit that.
        U = torch.cat([u1, u2])
        U_all = U if prep_dist is None else torch.cat([u1_all, u2_all])
        return [_Block(U, U_all, torch.cat([rows + total, rows]), torch.cat([rows, rows + total]))]
    if layout == "cross":
        return [_Block(u1, u2_all, rows, None)]
    return [_Block(u1, u2_all, rows, None), _Block(u2, u1_all, rows, None)]  # cross_sym


def _local_anchor_rows(layout: str, n: int, ctx) -> torch.Tensor:
    """Where this rank's anchors sit among the global batch's anchors (in ``"none"`` order)."""
    rows = torch.arange(n) + ctx.rank * n
    if layout == "cross":
        return rows
    return torch.cat([rows, rows + ctx.world_size * n])


def _positive_similarity(blocks) -> torch.Tensor:
    return torch.cat([(b.anchors * b.candidates[b.pos_index]).sum(dim=1) for b in blocks])


def _negative_lse(prep, inv_temp: Optional[torch.Tensor],
                  logit_map: LogitMap = LogitMap.SCALED, artanh_scale: float = 0.0,
                  artanh_eps: float = 0.0):
    """``lse_neg`` of every block's anchor rows by the backend's primitive, through the custom
    op of ``_ops.py`` (opaque to ``torch.compile``). ``operand_dtype`` (the inputs' dtype) tells a
    kernel which precision its GEMM operands may be rounded to (the tensor cores for half inputs);
    statistics and gradients stay in the compute dtype. A block whose anchors are its candidates
    (layout 2n, one process) passes them once: ``S`` is symmetric."""
    out, r0 = [], 0
    for b in prep.blocks:
        m = b.anchors.shape[0]
        inv_temp_rows = inv_temp[r0:r0 + m] if inv_temp is not None else None
        candidates = None if b.candidates is b.anchors else b.candidates
        out.append(_ops.negative_lse(prep.name, b.anchors, candidates, inv_temp_rows,
                                     b.pos_index, b.self_index, logit_map, artanh_scale,
                                     artanh_eps, prep.out_dtype))
        r0 += m
    return torch.cat(out)


class _Prepared(NamedTuple):
    u1: Optional[torch.Tensor]  # local rows, normalised (None for the reference backend)
    u2: Optional[torch.Tensor]
    blocks: Optional[list]
    name: str  # the resolved backend's name
    out_dtype: torch.dtype
    dist: Optional[distributed.DistContext]  # None: the local loss
    gather: Optional[Callable]  # rows of every rank, with the gradient semantics asked for

    @property
    def is_reference(self) -> bool:
        return self.name == "reference"


def _prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate,
             names=("z1", "z2"), gather_kind="with_grad"):
    """Shared validation and set-up of every loss."""
    V.check_bool("validate", validate)
    V.check_embedding_pair(names[0], z1, names[1], z2, validate=validate)
    V.check_choice("layout", layout, V.LAYOUTS)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_bool("normalize", normalize)
    V.check_bool("gather_distributed", gather_distributed)
    V.check_backend(backend)
    name = resolve_backend(backend, z1.device, z1.shape[1], z1.dtype)
    ctx = distributed.context(gather_distributed)
    gather = None
    if ctx is not None:
        distributed.check_equal_rows(z1.shape[0], z1.device, ctx)
        gather_fn = {"with_grad": distributed.gather_with_grad,
                     "local_grad": distributed.gather_local_grad}[gather_kind]
        gather = functools.partial(gather_fn, ctx=ctx)
    if name == "reference":
        return _Prepared(None, None, None, name, z1.dtype, ctx, gather)
    u1, u2 = (_math.normalize(z, normalize) for z in (z1, z2))
    return _Prepared(u1, u2, _blocks(u1, u2, layout, ctx, gather), name, z1.dtype, ctx, gather)


def _reference_loss(prep: _Prepared, fn: Callable, z1, z2, layout: str, reduction: str,
                    **kwargs):
    """The full-matrix oracle. Distributed, it computes the global batch's per-anchor losses from
    the gathered inputs and keeps this rank's anchors: the same semantics as the kernels' path
    (local anchors, gathered candidates) at the oracle's ``O(M * K)`` cost."""
    if prep.dist is None:
        return fn(z1, z2, layout=layout, reduction=reduction, **kwargs)
    wide = compute_dtype(z1.dtype)  # the reference computes in this dtype anyway
    z1_all, z2_all = (prep.gather(z.to(wide)) for z in (z1, z2))
    if kwargs.get("weights") is not None:  # one per local anchor row, in local "none" order
        halves = kwargs["weights"].to(wide).chunk(1 if layout == "cross" else 2)
        kwargs["weights"] = torch.cat([prep.gather(h) for h in halves])
    per_anchor = fn(z1_all, z2_all, layout=layout, reduction="none", **kwargs)
    stats = None
    if isinstance(per_anchor, tuple):  # MACL's (loss, tau, alignment)
        per_anchor, tau, alignment = per_anchor
        rows = _local_anchor_rows(layout, z1.shape[0], prep.dist).to(per_anchor.device)
        stats = (tau[rows] if tau.dim() == 1 else tau, alignment[rows] if alignment.dim() == 1
                 else alignment)
    rows = _local_anchor_rows(layout, z1.shape[0], prep.dist).to(per_anchor.device)
    out = _math.reduce(per_anchor.to(wide)[rows], reduction, z1.dtype)
    return (out, *stats) if stats is not None else out


def _constant_rows(value: float, m: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((m,), value, dtype=like.dtype, device=like.device)


def _dclw_weights(prep: _Prepared, sigma: float) -> torch.Tensor:
    """DCLW's ``w_i = 2 - N softmax_i(u1_i . u2_i / sigma)`` over the global batch (no gradient)."""
    alignment = (prep.u1.detach() * prep.u2.detach()).sum(1)
    if prep.dist is None:
        return _math.dclw_weights(alignment, sigma)
    n, ctx = prep.u1.shape[0], prep.dist
    weights = _math.dclw_weights(distributed.gather_no_grad(alignment, ctx), sigma)
    return weights[ctx.rank * n:(ctx.rank + 1) * n]


def _finish(per_anchor: torch.Tensor, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    return _math.reduce(per_anchor, reduction, out_dtype)


def _outside_autocast(fn: Callable) -> Callable:
    """Run a loss with autocast off. Under ``torch.autocast`` the embeddings arrive in half
    precision; the loss upcasts them itself (float32 logits, LSE and accumulators, docs/math.md#numerical-hazards)
    and returns the loss and gradients in the inputs' dtype. Left on, autocast would silently
    round the similarity GEMMs of the reference and torch backends to half precision."""

    @functools.wraps(fn)
    def wrapper(z1, *args, **kwargs):
        device_type = z1.device.type if isinstance(z1, torch.Tensor) else "cpu"
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(z1, *args, **kwargs)
        return fn(z1, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------------


@_outside_autocast
def infonce_loss(z1, z2, *, temperature=0.1, layout="2n", normalize=True, reduction="mean",
                 gather_distributed=False, backend="auto", validate=True):
    """NT-Xent / InfoNCE: ``loss_a = -log P_ap``, ``l_ak = S_ak / temperature``.

    Args:
        z1, z2: ``[N, D]`` embeddings of the two views (N >= 2), any floating dtype.
        temperature: ``tau > 0``.
        layout: ``"2n"`` (SimCLR, 2N anchors), ``"cross"`` (SimCSE, N anchors) or ``"cross_sym"``.
        normalize: L2-normalise the rows first (``False`` if the caller already did).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the M per-anchor losses).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"``.
        validate: ``False`` skips the data-dependent checks (finiteness; a host sync).
    """
    temperature = V.check_positive("temperature", temperature)
    prep = _prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate)
    if prep.is_reference:
        return _reference_loss(prep, reference.infonce_loss, z1, z2, layout, reduction,
                               temperature=temperature, normalize=normalize)
    s_pos = _positive_similarity(prep.blocks)
    inv_temp = _constant_rows(1.0 / temperature, s_pos.shape[0], s_pos)
    x = _negative_lse(prep, inv_temp) - inv_temp * s_pos
    return _finish(softplus(x), reduction, prep.out_dtype)


def clip_loss(image_features, text_features, logit_scale, *, normalize=True, reduction="mean",
              gather_distributed=False, backend="auto", validate=True):
    """Symmetric CLIP loss: ``l_ij = s S_ij``, the mean of the row-wise and column-wise
    cross-entropies (layout ``"cross_sym"``).

    ``logit_scale`` is the already-exponentiated scale ``s`` (a float, or a 0-d tensor; when it
    requires grad, ``dL/ds = sum_ij G_ij S_ij`` is returned to it).
    """
    return _clip(image_features, text_features, logit_scale, normalize=normalize,
                 reduction=reduction, gather_distributed=gather_distributed, backend=backend,
                 validate=validate)


@_outside_autocast
def _clip(image_features, text_features, logit_scale, *, normalize, reduction,
          gather_distributed, backend, validate, gather_kind="with_grad"):
    """``clip_loss``; ``gather_kind="local_grad"`` is OpenCLIP's ``gather_with_grad=False``."""
    prep = _prepare(image_features, text_features, "cross_sym", normalize, reduction,
                    gather_distributed, backend, validate,
                    names=("image_features", "text_features"), gather_kind=gather_kind)
    logit_scale = V.check_logit_scale(logit_scale, image_features, validate=validate)
    if prep.is_reference:
        def reference_clip(z1, z2, layout, **kwargs):
            return reference.clip_loss(z1, z2, logit_scale, **kwargs)

        return _reference_loss(prep, reference_clip, image_features, text_features, "cross_sym",
                               reduction, normalize=normalize)
    s_pos = _positive_similarity(prep.blocks)
    if isinstance(logit_scale, torch.Tensor):
        inv_temp = logit_scale.to(device=s_pos.device, dtype=s_pos.dtype).expand(s_pos.shape[0])
    else:
        inv_temp = _constant_rows(logit_scale, s_pos.shape[0], s_pos)
    x = _negative_lse(prep, inv_temp) - inv_temp * s_pos
    return _finish(softplus(x), reduction, prep.out_dtype)


@_outside_autocast
def dcl_loss(z1, z2, *, temperature=0.1, weighted=False, sigma=0.5, layout="2n", normalize=True,
             reduction="mean", gather_distributed=False, backend="auto", validate=True,
             weights: Optional[torch.Tensor] = None):
    """Decoupled contrastive loss: ``loss_a = -w_a l_ap + LSE_{k in Neg(a)} l_ak``.

    ``weighted=True`` is DCLW: ``w_i = 2 - N softmax_i(u1_i . u2_i / sigma)`` (no gradient, the
    same ``w_i`` for both views); otherwise ``w = 1``. ``weights`` (``[M]``, one per anchor row,
    may carry gradient) overrides both: it is how ``DCLLoss(weight_fn=...)`` reaches the kernels.
    """
    temperature = V.check_positive("temperature", temperature)
    sigma = V.check_positive("sigma", sigma)
    V.check_bool("weighted", weighted)
    prep = _prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate)
    m = z1.shape[0] * (1 if layout == "cross" else 2)
    weights = V.optional_tensor_arg("weights", weights, m, z1)
    if prep.is_reference:
        return _reference_loss(prep, reference.dcl_loss, z1, z2, layout, reduction,
                               temperature=temperature, weighted=weighted, sigma=sigma,
                               normalize=normalize, weights=weights)
    s_pos = _positive_similarity(prep.blocks)
    inv_temp = _constant_rows(1.0 / temperature, m, s_pos)
    if weights is None:
        weights = (
            _math.per_anchor_rows(_dclw_weights(prep, sigma), layout)
            if weighted else torch.ones_like(s_pos)
        )
    per_anchor = _negative_lse(prep, inv_temp) - weights * (inv_temp * s_pos)
    return _finish(per_anchor, reduction, prep.out_dtype)


def macl_loss(z1, z2, *, temperature=0.1, alpha=0.5, a0=0.0, schedule="linear",
              temperature_mode="batch", reweight=True, layout="2n", normalize=True,
              reduction="mean", gather_distributed=False, backend="auto", validate=True):
    """Model-Aware Contrastive Learning (ICML 2023).

    ``A = sg(mean over positive pairs of S_a,p(a))`` (``temperature_mode="anchor"``: one ``A_a``
    per anchor), ``tau = temperature * (1 + alpha (A - a0))`` (``schedule="linear"``) or
    ``temperature * alpha ** A`` (``"exp"``), clamped at ``min(1e-3, temperature)`` so it never
    reaches zero or flips sign. ``loss_a = -sg(V_a) log P_ap`` with ``V_a = 1 / (1 - P_ap)``
    (``reweight=False``: InfoNCE at ``tau(A)``). Its gradient is DCL's at ``tau(A)``:
    ``(Q - Y) / (M tau)``.
    """
    loss, _, _ = _macl(z1, z2, temperature=temperature, alpha=alpha, a0=a0, schedule=schedule,
                       temperature_mode=temperature_mode, reweight=reweight, layout=layout,
                       normalize=normalize, reduction=reduction,
                       gather_distributed=gather_distributed, backend=backend, validate=validate)
    return loss


@_outside_autocast
def _macl(z1, z2, *, temperature, alpha, a0, schedule, temperature_mode, reweight, layout,
          normalize, reduction, gather_distributed, backend, validate):
    """``macl_loss`` plus the temperature and alignment it used (detached, for logging)."""
    temperature = V.check_positive("temperature", temperature)
    alpha = V.check_real("alpha", alpha)
    a0 = V.check_real("a0", a0)
    V.check_choice("schedule", schedule, V.SCHEDULES)
    V.check_choice("temperature_mode", temperature_mode, V.TEMPERATURE_MODES)
    V.check_bool("reweight", reweight)
    if schedule == "exp" and alpha <= 0:
        raise ValueError(f"alpha must be > 0 for schedule='exp' (tau = t0 * alpha ** A), got {alpha}")
    prep = _prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate)
    if prep.is_reference:
        return _reference_loss(prep, reference.macl_loss, z1, z2, layout, reduction,
                               temperature=temperature, alpha=alpha, a0=a0, schedule=schedule,
                               temperature_mode=temperature_mode, reweight=reweight,
                               normalize=normalize, return_stats=True)
    s_pos = _positive_similarity(prep.blocks)
    alignment = s_pos.detach()
    if temperature_mode == "batch":  # the global batch's mean: one all-reduce of a scalar
        alignment = alignment.mean() if prep.dist is None else distributed.global_mean(
            alignment, prep.dist)
    tau = _math.macl_temperature(alignment, temperature, alpha, a0, schedule)
    inv_temp = (1.0 / tau).expand(s_pos.shape[0])
    x = _negative_lse(prep, inv_temp) - inv_temp * s_pos
    if reweight:
        # Value (1 + e^-x) softplus(x); gradient in x exactly sg(V) sigmoid(x) = 1.
        per_anchor = _math.macl_value(x).detach() + (x - x.detach())
    else:
        per_anchor = softplus(x)
    return _finish(per_anchor, reduction, prep.out_dtype), tau, alignment


@_outside_autocast
def tfree_loss(z1, z2, *, scale=2.0, eps=1e-6, layout="2n", normalize=True, reduction="mean",
               gather_distributed=False, backend="auto", validate=True):
    """Temperature-free InfoNCE: ``l_ak = scale * artanh(clamp(S_ak, -1 + eps, 1 - eps))``,
    ``loss_a = -log P_ap``. The clamp keeps ``artanh`` finite; its gradient is 0 where it clamps."""
    scale = V.check_positive("scale", scale)
    eps = V.check_open_unit("eps", eps)
    prep = _prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate)
    if prep.is_reference:
        return _reference_loss(prep, reference.tfree_loss, z1, z2, layout, reduction,
                               scale=scale, eps=eps, normalize=normalize)
    s_pos = _positive_similarity(prep.blocks)
    l_pos = scale * torch.atanh(s_pos.clamp(-1 + eps, 1 - eps))
    x = _negative_lse(prep, None, LogitMap.ARTANH, scale, eps) - l_pos
    return _finish(softplus(x), reduction, prep.out_dtype)

