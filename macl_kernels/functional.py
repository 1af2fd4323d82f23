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

SigLIP (``siglip_loss``) uses the primitive's other row reduction, a sum of softplus over
``Neg(a)`` with the logit bias inside (``docs/math.md#siglip``): ``r_a = sp_neg[a] +
softplus(-l_ap)``, the positive's term computed here in ``O(M D)``.

``softplus(x)`` avoids both ``log(softmax)`` underflow and the cancellation in ``1 - P``.
``LSE`` over all candidates, if ever wanted, is ``logaddexp(lse_neg, l_ap)``.

Shapes: ``z1, z2`` are ``[N, D]``; anchors ``M`` = ``2N`` (layout ``"2n"``), ``N``
(``"cross"``) or ``2N`` (``"cross_sym"``: the N row-anchors, then the N column-anchors).
``reduction="none"`` returns the ``M`` per-anchor losses in that order.

One function per loss, as ``torch.nn.functional``: the set-up they share (validation, the
layouts' blocks, the primitive's call, the distributed reference path) is ``_assembly.py``; the
drop-in modules call these same functions, with their peers' edge behaviour set by
``_assembly.peer_semantics`` (no extra argument, docs/design.md#module-map).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _math, primitive
from . import _validate as V
from ._validate import LAYOUTS  # noqa: F401  (the layouts every loss accepts; the tools list them)
from . import distributed, reference
from ._assembly import (check_temperature, constant_rows, finish, negative_lse,
                        outside_autocast, peer, positive_similarity, prepare, record_stats,
                        reference_loss, row_dot, scalar_rows, zero_if_no_negative)
from ._math import MACL_TEMPERATURE_FLOOR, compute_dtype, softplus
from .primitive import LogitMap, RowReduction
from .primitive import available_backends, resolve_backend

__all__ = [
    "macl_loss", "infonce_loss", "clip_loss", "dcl_loss", "tfree_loss", "moco_loss",
    "siglip_loss", "available_backends", "MACL_TEMPERATURE_FLOOR",
]


@outside_autocast
def infonce_loss(z1, z2, *, temperature=0.1, layout="2n", normalize=True, reduction="mean",
                 gather_distributed=False, backend="auto", validate=True, negatives=None,
                 labels=None):
    """NT-Xent / InfoNCE: ``loss_a = -log P_ap``, ``l_ak = S_ak / temperature``.

    Args:
        z1, z2: ``[N, D]`` embeddings of the two views, any floating dtype. Every anchor needs
            a negative: ``N >= 2`` over the global batch, or ``N = 1`` with ``negatives``
            (layouts ``2n`` and ``cross``).
        temperature: ``tau > 0``.
        layout: ``"2n"`` (SimCLR, 2N anchors), ``"cross"`` (SimCSE, N anchors) or ``"cross_sym"``.
        normalize: L2-normalise the rows first (``False`` if the caller already did).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the M per-anchor losses).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"``.
        validate: ``True`` (default) checks types, shapes and options only and reads no
            tensor data (no host synchronisation; NaN/Inf inputs give a non-finite loss, as in
            PyTorch); ``"full"`` adds the data checks (finiteness; a host synchronisation) with
            a clear ``ValueError``; ``False`` checks nothing.
        negatives: optional extra candidates ``[K', D]`` (hard negatives, a queue; with or
            without gradient; normalised like ``z1``, ``z2``), appended to the layout's own
            candidates: every anchor of ``"2n"`` and ``"cross"`` sees all of them, in
            ``"cross_sym"`` only the ``z1`` anchors (the row direction) do. Distributed, each
            rank's negatives are gathered like the other candidates (same ``K'`` on every
            rank). ``layout="cross"`` with ``temperature = 1 / scale`` and the flattened hard
            negatives is sentence-transformers' ``MultipleNegativesRankingLoss``.
        labels: optional ``[N]`` integer class of each pair: false-negative masking. The
            positive stays the other view; every candidate of the anchor's label leaves the
            denominator (docs/math.md#label-masked-negatives). An anchor left without a negative
            gets loss 0 (and no gradient). Distributed, the labels are gathered too. Not with
            ``negatives``.
    """
    lenient = peer().lenient  # NTXentLoss: any non-zero temperature, a batch of one gives 0
    temperature = check_temperature(temperature, lenient)
    prep = prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate,
                   negatives=negatives, allow_empty=lenient, labels=labels)
    if prep.is_reference:
        return reference_loss(prep, reference.infonce_loss, z1, z2, layout, reduction,
                               temperature=temperature, normalize=normalize, labels=labels)
    s_pos = positive_similarity(prep.blocks)
    inv_temp = constant_rows(1.0 / temperature, s_pos.shape[0], s_pos)
    lse_neg = negative_lse(prep, inv_temp)
    per_anchor = softplus(lse_neg - inv_temp * s_pos)
    return finish(zero_if_no_negative(per_anchor, lse_neg, labels), reduction, prep.out_dtype)


@outside_autocast
def clip_loss(image_features, text_features, logit_scale, *, normalize=True, reduction="mean",
              gather_distributed=False, backend="auto", validate=True, negatives=None):
    """Symmetric CLIP loss: ``l_ij = s S_ij``, the mean of the row-wise and column-wise
    cross-entropies (layout ``"cross_sym"``).

    ``logit_scale`` is the already-exponentiated scale ``s`` (a float, or a 0-d tensor; when it
    requires grad, ``dL/ds = sum_ij G_ij S_ij`` is returned to it). ``negatives``: extra text
    candidates ``[K', D]`` (hard-negative captions) seen by the image anchors only.
    """
    # ClipLoss: OpenCLIP's edge behaviour (a batch of one gives 0, any finite float scale) and its
    # gather semantics (``PeerSemantics.gather_kind``).
    lenient, gather_kind = peer().lenient, peer().gather_kind
    prep = prepare(image_features, text_features, "cross_sym", normalize, reduction,
                   gather_distributed, backend, validate,
                   names=("image_features", "text_features"), gather_kind=gather_kind,
                   negatives=negatives, allow_empty=lenient)
    logit_scale = V.check_logit_scale(logit_scale, image_features,
                                      validate=V.check_validate(validate), any_sign=lenient)
    if prep.is_reference and prep.dist is not None and gather_kind == "no_grad":
        # Every gathered row a constant: each direction is this rank's anchors against the
        # detached local rows (their positives) plus the other ranks' rows as extra negatives.
        n, r = image_features.shape[0], prep.dist.rank
        wide = compute_dtype(image_features.dtype)

        def direction(anchors, others):
            everyone = prep.gather(others.to(wide))
            rest = torch.cat([everyone[:r * n], everyone[(r + 1) * n:]])
            return reference.clip_loss(anchors.to(wide), others.to(wide).detach(), logit_scale,
                                       normalize=normalize, reduction="none",
                                       negatives=rest)[:n]

        per_anchor = torch.cat([direction(image_features, text_features),
                                direction(text_features, image_features)])
        return _math.reduce(per_anchor, reduction, image_features.dtype)
    if prep.is_reference:
        def reference_clip(z1, z2, layout, **kwargs):
            return reference.clip_loss(z1, z2, logit_scale, **kwargs)

        return reference_loss(prep, reference_clip, image_features, text_features, "cross_sym",
                               reduction, normalize=normalize)
    s_pos = positive_similarity(prep.blocks)
    if isinstance(logit_scale, torch.Tensor):
        inv_temp = logit_scale.to(device=s_pos.device, dtype=s_pos.dtype).expand(s_pos.shape[0])
    else:
        inv_temp = constant_rows(logit_scale, s_pos.shape[0], s_pos)
    x = negative_lse(prep, inv_temp) - inv_temp * s_pos
    return finish(softplus(x), reduction, prep.out_dtype)


def _dclw_weights(prep, sigma: float) -> torch.Tensor:
    """DCLW's ``w_i = 2 - N softmax_i(u1_i . u2_i / sigma)`` over the global batch (no gradient)."""
    alignment = (prep.u1.detach() * prep.u2.detach()).sum(1)
    if prep.dist is None:
        return _math.dclw_weights(alignment, sigma)
    n, ctx = prep.u1.shape[0], prep.dist
    weights = _math.dclw_weights(distributed.gather_no_grad(alignment, ctx), sigma)
    return weights[ctx.rank * n:(ctx.rank + 1) * n]


@outside_autocast
def dcl_loss(z1, z2, *, temperature=0.1, weighted=False, sigma=0.5, layout="2n", normalize=True,
             reduction="mean", gather_distributed=False, backend="auto", validate=True,
             weights: Optional[torch.Tensor] = None, negatives=None, labels=None):
    """Decoupled contrastive loss: ``loss_a = -w_a l_ap + LSE_{k in Neg(a)} l_ak``.

    ``weighted=True`` is DCLW: ``w_i = 2 - N softmax_i(u1_i . u2_i / sigma)`` (no gradient, the
    same ``w_i`` for both views); otherwise ``w = 1``. ``weights`` (``[M]``, one per anchor row,
    may carry gradient) overrides both: it is how ``DCLLoss(weight_fn=...)`` reaches the kernels.
    ``negatives``: extra candidates, ``labels``: false-negative masking, as in ``infonce_loss``.
    """
    # DCLLoss / DCLWLoss: lightly's any non-zero temperature, and a batch of one gives ``-inf``
    # (the LSE over an empty set of negatives).
    lenient = peer().lenient
    temperature = check_temperature(temperature, lenient)
    sigma = V.check_positive("sigma", sigma)
    V.check_bool("weighted", weighted)
    prep = prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate,
                   negatives=negatives, allow_empty=lenient, labels=labels)
    m = z1.shape[0] * (1 if layout == "cross" else 2)
    weights = V.optional_tensor_arg("weights", weights, m, z1)
    if prep.is_reference:
        return reference_loss(prep, reference.dcl_loss, z1, z2, layout, reduction,
                               temperature=temperature, weighted=weighted, sigma=sigma,
                               normalize=normalize, weights=weights, labels=labels)
    s_pos = positive_similarity(prep.blocks)
    inv_temp = constant_rows(1.0 / temperature, m, s_pos)
    if weights is None:
        weights = (
            _math.per_anchor_rows(_dclw_weights(prep, sigma), layout)
            if weighted else torch.ones_like(s_pos)
        )
    lse_neg = negative_lse(prep, inv_temp)
    per_anchor = lse_neg - weights * (inv_temp * s_pos)
    return finish(zero_if_no_negative(per_anchor, lse_neg, labels), reduction, prep.out_dtype)


def _macl_options(temperature, alpha, a0, schedule, temperature_mode, reweight):
    temperature = V.check_positive("temperature", temperature)
    alpha = V.check_real("alpha", alpha)
    a0 = V.check_real("a0", a0)
    V.check_choice("schedule", schedule, V.SCHEDULES)
    V.check_choice("temperature_mode", temperature_mode, V.TEMPERATURE_MODES)
    V.check_bool("reweight", reweight)
    if schedule == "exp" and alpha <= 0:
        raise ValueError(f"alpha must be > 0 for schedule='exp' (tau = t0 * alpha ** A), got "
                         f"{alpha}")
    return temperature, alpha, a0


def _macl_rows(x: torch.Tensor, reweight: bool) -> torch.Tensor:
    """MACL's per-anchor loss from ``x_a``: value ``(1 + e^-x) softplus(x)``, gradient in ``x``
    exactly ``sg(V) sigmoid(x) = 1``."""
    if reweight:
        return _math.macl_value(x).detach() + (x - x.detach())
    return softplus(x)


@outside_autocast
def macl_loss(z1, z2, *, temperature=0.1, alpha=0.5, a0=0.0, schedule="linear",
              temperature_mode="batch", reweight=True, layout="2n", normalize=True,
              reduction="mean", gather_distributed=False, backend="auto", validate=True,
              negatives=None, labels=None):
    """Model-Aware Contrastive Learning (ICML 2023).

    ``A = sg(mean over positive pairs of S_a,p(a))`` (``temperature_mode="anchor"``: one ``A_a``
    per anchor), ``tau = temperature * (1 + alpha (A - a0))`` (``schedule="linear"``) or
    ``temperature * alpha ** A`` (``"exp"``), clamped at ``min(1e-3, temperature)`` so it never
    reaches zero or flips sign. ``loss_a = -sg(V_a) log P_ap`` with ``V_a = 1 / (1 - P_ap)``
    (``reweight=False``: InfoNCE at ``tau(A)``). Its gradient is DCL's at ``tau(A)``:
    ``(Q - Y) / (M tau)``. ``negatives``: extra candidates, as in ``infonce_loss`` (they never
    enter ``A``). With a MoCo queue: ``moco_loss(..., loss="macl")``. ``labels``: false-negative
    masking as in ``infonce_loss`` (``A`` stays over the augmentation pairs).
    """
    temperature, alpha, a0 = _macl_options(temperature, alpha, a0, schedule, temperature_mode,
                                           reweight)
    prep = prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate,
                   negatives=negatives, labels=labels)
    if prep.is_reference:
        loss, tau, alignment = reference_loss(
            prep, reference.macl_loss, z1, z2, layout, reduction, labels=labels,
            temperature=temperature, alpha=alpha, a0=a0, schedule=schedule,
            temperature_mode=temperature_mode, reweight=reweight, normalize=normalize,
            return_stats=True)
        record_stats(tau, alignment)
        return loss
    s_pos = positive_similarity(prep.blocks)
    alignment = s_pos.detach()
    if temperature_mode == "batch":  # the global batch's mean: one all-reduce of a scalar
        alignment = alignment.mean() if prep.dist is None else distributed.global_mean(
            alignment, prep.dist)
    tau = _math.macl_temperature(alignment, temperature, alpha, a0, schedule)
    inv_temp = (1.0 / tau).expand(s_pos.shape[0])
    lse_neg = negative_lse(prep, inv_temp)
    x = lse_neg - inv_temp * s_pos
    if labels is not None:  # an empty Neg(a) (x = -inf): a harmless x there, the row is zeroed
        x = torch.where(lse_neg == float("-inf"), torch.zeros_like(x), x)
    per_anchor = zero_if_no_negative(_macl_rows(x, reweight), lse_neg, labels)
    record_stats(tau, alignment.detach())  # MACLLoss logs them (last_temperature, ...)
    return finish(per_anchor, reduction, prep.out_dtype)


@outside_autocast
def tfree_loss(z1, z2, *, scale=2.0, eps=1e-6, layout="2n", normalize=True, reduction="mean",
               gather_distributed=False, backend="auto", validate=True, negatives=None):
    """Temperature-free InfoNCE: ``l_ak = scale * artanh(clamp(S_ak, -1 + eps, 1 - eps))``,
    ``loss_a = -log P_ap``. The clamp keeps ``artanh`` finite; its gradient is 0 where it clamps.
    ``negatives``: extra candidates, as in ``infonce_loss``."""
    scale = V.check_positive("scale", scale)
    eps = V.check_open_unit("eps", eps)
    prep = prepare(z1, z2, layout, normalize, reduction, gather_distributed, backend, validate,
                   negatives=negatives)
    if prep.is_reference:
        return reference_loss(prep, reference.tfree_loss, z1, z2, layout, reduction,
                               scale=scale, eps=eps, normalize=normalize)
    s_pos = positive_similarity(prep.blocks)
    l_pos = scale * torch.atanh(s_pos.clamp(-1 + eps, 1 - eps))
    x = negative_lse(prep, None, LogitMap.ARTANH, scale, eps) - l_pos
    return finish(softplus(x), reduction, prep.out_dtype)


# --------------------------------------------------------------------------------------------
# MoCo: queries against a memory bank (docs/math.md#memory-bank-moco)
# --------------------------------------------------------------------------------------------


class _FixedCandidatesLse(torch.autograd.Function):
    """``lse_neg`` of anchors against candidates that need no gradient (a memory bank), with no
    positive among them (``pos_index = -1``: ``Neg(a)`` is every candidate).

    ``lse_neg[a]`` depends on anchor row ``a`` (and ``inv_temp[a]``) only, so its gradient is
    per row: the backend's backward with a unit upstream gradient, run inside this forward,
    gives ``d lse_neg[a] / d anchors[a] = inv_temp[a] O_a`` (``O_a = sum_k Q_ak bank_k``) and
    ``d lse_neg[a] / d inv_temp[a] = anchors[a] . O_a``; backward only scales them by ``g``.
    Nothing of the bank is saved for backward: the caller may overwrite the bank in place right
    after this call (the enqueue of a memory bank), and no copy of it is needed."""

    @staticmethod
    def forward(ctx, backend, anchors, candidates, inv_temp, pos_index, operand_dtype):
        need_anchors, need_inv_temp = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        scalars = (int(LogitMap.SCALED), 0.0, 0.0, operand_dtype)
        lse_neg, aux, _ = primitive.negative_lse_op(backend, anchors, candidates, inv_temp,
                                                    pos_index, None, *scalars,
                                                    need_anchors or need_inv_temp)
        d_anchors = d_inv_temp = None
        if need_anchors or need_inv_temp:
            d_anchors, _, d_inv_temp, _ = primitive.negative_lse_backward_op(
                backend, anchors, candidates, inv_temp, pos_index, None, *scalars, lse_neg, aux,
                torch.ones_like(lse_neg), need_anchors, False, need_inv_temp)
        ctx.save_for_backward(d_anchors if need_anchors else None,
                              d_inv_temp if need_inv_temp else None)
        return lse_neg

    @staticmethod
    def backward(ctx, g):
        d_anchors, d_inv_temp = ctx.saved_tensors
        return (None, None if d_anchors is None else g[:, None] * d_anchors, None,
                None if d_inv_temp is None else g * d_inv_temp, None, None)


@outside_autocast
def moco_loss(query, key, bank, *, temperature=0.1, loss="infonce", alpha=0.5, a0=0.0,
              schedule="linear", temperature_mode="batch", in_batch_negatives=False,
              normalize=True, reduction="mean", gather_distributed=False, backend="auto",
              validate=True):
    """MoCo / lightly memory-bank loss: each query against its key and a bank of negatives.

    ``u_q = normalize(query)``, ``u_k = normalize(key)`` (``[N, D]``); ``bank`` ``[Q, D]`` holds
    rows used as given (a memory bank stores normalised keys), of any floating dtype and device:
    it is cast to the queries' compute dtype and device per call and never needs a gradient.
    The queries are the only anchors; the positive logit ``l_a = u_q[a] . u_k[a] / tau`` is
    computed outside the tiles and the candidates are the bank alone (``Neg(a)`` = every bank
    row, no in-batch negatives), so ``x_a = LSE_k (u_q[a] . bank_k / tau) - l_a`` and

        loss="infonce"  softplus(x_a)  (lightly's NTXentLoss with a memory bank, MoCo v2)
        loss="dcl"      x_a
        loss="macl"     MACL at tau(A) with A = sg(mean_a u_q[a] . u_k[a]): the bank never enters A
                        (the official MACL code with a queue); gather_distributed=True makes A
                        the mean over every rank's pairs

    ``in_batch_negatives=True`` adds the other keys of the batch as negatives (candidates
    ``[u_k; bank]``, MoCo-v3 style): a different loss, never lightly's. The gradient reaches
    ``query`` and (through its positive logit, and the in-batch negatives) ``key``; never the
    bank. The bank's rows are not saved for backward: it may be updated in place after the call.
    """
    mode = V.check_validate(validate)
    V.check_choice("loss", loss, V.MOCO_LOSSES)
    if loss == "macl":
        temperature, alpha, a0 = _macl_options(temperature, alpha, a0, schedule,
                                               temperature_mode, True)
    else:
        temperature = check_temperature(temperature, peer().lenient)  # lightly: any sign
    V.check_embedding_pair("query", query, "key", key, validate=mode)
    V.check_bool("in_batch_negatives", in_batch_negatives)
    V.check_bool("normalize", normalize)
    V.check_bool("gather_distributed", gather_distributed)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_backend(backend)
    bank = V.check_bank("bank", bank, query, mode)
    if mode != "none":
        V.check_has_negatives(bank.shape[0] + (query.shape[0] - 1 if in_batch_negatives else 0),
                              f"a bank of {bank.shape[0]} row(s)" +
                              (f" and a batch of {query.shape[0]}" if in_batch_negatives else ""))
    name = resolve_backend(backend, query.device, query.shape[1], query.dtype)
    ctx = distributed.context(gather_distributed)
    wide = compute_dtype(query.dtype)
    u_q, u_k = _math.normalize(query, normalize), _math.normalize(key, normalize)
    bank_rows = bank.to(device=query.device, dtype=wide)  # a no-op when it already matches
    s_pos = (u_q * u_k).sum(dim=1)
    alignment = tau = None
    if loss == "macl":
        alignment = s_pos.detach()
        if temperature_mode == "batch":
            alignment = alignment.mean() if ctx is None else distributed.global_mean(alignment,
                                                                                     ctx)
        tau = _math.macl_temperature(alignment, temperature, alpha, a0, schedule)
    if name == "reference":
        per_anchor = reference.moco_loss(query, key, bank, temperature=temperature, loss=loss,
                                         tau=tau, in_batch_negatives=in_batch_negatives,
                                         normalize=normalize, reduction="none")
        return _math.reduce(per_anchor.to(wide), reduction, query.dtype)
    n = u_q.shape[0]
    inv_temp = (1.0 / tau).expand(n) if tau is not None else constant_rows(1.0 / temperature,
                                                                            n, u_q)
    if in_batch_negatives:
        rows = torch.arange(n, device=u_q.device)
        lse_neg = primitive.negative_lse(name, u_q, torch.cat([u_k, bank_rows]), inv_temp, rows,
                                         None, operand_dtype=query.dtype)
    else:
        no_positive = torch.full((n,), -1, dtype=torch.int64, device=u_q.device)
        lse_neg = _FixedCandidatesLse.apply(name, u_q.contiguous(), bank_rows.contiguous(),
                                            inv_temp.contiguous(), no_positive, query.dtype)
    x = lse_neg - inv_temp * s_pos
    if loss == "infonce":
        per_anchor = softplus(x)
    elif loss == "dcl":
        per_anchor = x
    else:
        per_anchor = _macl_rows(x, True)
    return finish(per_anchor, reduction, query.dtype)


@outside_autocast
def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, normalize=True,
                reduction="mean", gather_distributed=False, backend="auto", validate=True):
    """SigLIP's pairwise sigmoid loss (OpenCLIP's ``SigLipLoss``): ``l_ij = t S_ij + b``, labels
    ``+1`` on the positive pair ``(i, i)`` and ``-1`` elsewhere, per image row
    ``r_i = sum_j softplus(-y_ij l_ij)``; ``"mean"`` is ``(1/B) sum_i r_i`` over the ``B`` image
    rows (not ``B^2``, no symmetrisation). ``"none"`` returns ``r`` (``[B]``).

    Args:
        image_features: ``[B, D]``, ``B >= 1`` (one image is a valid batch: no negatives).
        text_features: ``[K, D]``, ``K >= B``: text ``i`` is image ``i``'s positive, texts past
            ``B`` are extra negatives.
        logit_scale: the already-exponentiated scale ``t > 0`` (a float or a 0-d tensor; when
            it requires grad, ``dL/dt`` is returned to it).
        logit_bias: ``b``: ``None`` (no bias), a float, or a 0-d tensor (gradient returned when
            it requires grad).
        normalize: L2-normalise the rows first (the drop-in ``SigLipLoss`` does not, as
            OpenCLIP).
        gather_distributed: local images are the anchors, every rank's texts (gathered with
            gradient) the candidates, the positive at ``rank * K + i``.
        backend, validate: as for ``clip_loss``.
    """
    mode = V.check_validate(validate)
    B, K = V.check_image_text(image_features, text_features, validate=mode)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_bool("normalize", normalize)
    V.check_bool("gather_distributed", gather_distributed)
    V.check_backend(backend)
    logit_scale = V.check_logit_scale(logit_scale, image_features, validate=mode)
    logit_bias = V.check_logit_bias(logit_bias, image_features, validate=mode)
    name = resolve_backend(backend, image_features.device, image_features.shape[1],
                           image_features.dtype)
    ctx = distributed.context(gather_distributed)
    offset = 0
    gather = None
    if ctx is not None:
        # All-gather needs equal row counts: images (the local anchors) and texts alike.
        distributed.check_equal_rows(B, image_features.device, ctx, what="image batch")
        distributed.check_equal_rows(K, image_features.device, ctx, what="text batch")
        gather = functools.partial(distributed.gather_with_grad, ctx=ctx)
        offset = ctx.rank * K
    out_dtype = image_features.dtype
    if name == "reference":
        wide = compute_dtype(out_dtype)
        texts = text_features if gather is None else gather(text_features.to(wide))
        return reference.siglip_loss(image_features, texts, logit_scale, logit_bias,
                                     normalize=normalize, reduction=reduction,
                                     positive_offset=offset).to(out_dtype)
    u1 = _math.normalize(image_features, normalize)
    u2 = _math.normalize(text_features, normalize)
    if gather is not None:
        u2 = gather(u2)
    pos_index = torch.arange(B, device=u1.device) + offset
    # O(B D): the positive pair, out of the tile loop. The positives are the rows
    # offset .. offset + B of u2: a view, not a gathered copy (memory: docs/math.md#siglip).
    u2_pos = u2 if (offset == 0 and u2.shape[0] == B) else u2.narrow(0, offset, B)
    s_pos = row_dot(u1, u2_pos)
    inv_temp = scalar_rows(logit_scale, B, s_pos)
    row_bias = None if logit_bias is None else scalar_rows(logit_bias, B, s_pos)
    l_pos = inv_temp * s_pos + (0.0 if row_bias is None else row_bias)
    sp_neg = primitive.negative_lse(name, u1, u2, inv_temp, pos_index, None, LogitMap.SCALED,
                                    operand_dtype=out_dtype, row_reduction=RowReduction.SOFTPLUS,
                                    row_bias=row_bias)
    # softplus(-l_ap) split out: no cancellation at a large positive logit (docs/math.md#siglip).
    return finish(sp_neg + softplus(-l_pos), reduction, out_dtype)
