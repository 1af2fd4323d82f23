"""Losses whose positives come from labels or views (docs/math.md#supervised-contrastive-supcon):
SupCon (``supcon_loss``, SupContrast's semantics; the ``SupConLoss`` drop-in uses
``_supcon_pml`` for pytorch-metric-learning's), supervised MACL (``supcon_macl_loss``), and the
label renumbering and class sums they share. Their ``backend="reference"`` is the dense oracle
of ``reference.py`` (which shares nothing with this file).

Every one is the primitive plus per-class sums. With rows ``U`` (``V`` views of ``B`` samples,
view-major: row ``v * B + i``), ``l_ak = S_ak / T`` and ``P(a)`` the other rows of ``a``'s
label,

    lse_C[a]                = LSE_{k != a} l_ak                 (the primitive with no positive
                                                                 excluded: pos_index = -1)
    sum_{p in P(a)} S_ap    = u_a . (C_{y_a} - u_a),  C_c = sum_{k : y_k = c} u_k

so the positive term costs ``O(V B D)`` (an ``index_add``) and the ``M x K`` matrix is never
formed. Autograd differentiates the class sums; the primitive's backward gives the softmax part.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _math, primitive
from . import _validate as V
from . import distributed, reference
from ._math import compute_dtype
from .primitive import resolve_backend

__all__ = ["supcon_loss", "supcon_macl_loss"]

SUPCON_REDUCTIONS = ("mean", "mean_valid", "sum", "none")
CONTRAST_MODES = ("all", "one")


def dense_class_ids(labels: Tensor) -> Tensor:
    """Map arbitrary integer labels to ``0 .. C-1`` (``C <= len(labels)``) without a host
    synchronisation (``torch.unique`` would need one to size its output): sort, then number the
    runs."""
    sorted_labels, order = torch.sort(labels)
    new_run = torch.ones_like(sorted_labels, dtype=torch.bool)
    new_run[1:] = sorted_labels[1:] != sorted_labels[:-1]
    ids = torch.empty_like(labels)
    ids[order] = torch.cumsum(new_run.to(torch.int64), 0) - 1
    return ids


def class_sums(rows: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """``(C, n)``: per class id the sum of its rows (differentiable) and its row count."""
    sums = rows.new_zeros((rows.shape[0], rows.shape[1])).index_add(0, ids, rows)
    counts = rows.new_zeros(rows.shape[0]).index_add(0, ids, torch.ones_like(ids, dtype=rows.dtype))
    return sums, counts


def _check_features(features, mode: str) -> Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a tensor [B, V, ...], got {type(features).__name__}")
    if mode != "none":
        if not features.dtype.is_floating_point:
            raise TypeError(f"features must be a floating tensor, got dtype {features.dtype}")
        if features.dim() < 3:
            raise ValueError(f"features must be [B, V, ...] (at least 3 dimensions: batch, views, "
                             f"features), got shape {list(features.shape)}")
        if features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(f"features needs B >= 1 samples and V >= 1 views, got shape "
                             f"{list(features.shape)}")
        if mode == "full":
            V.check_finite("features", features)
    return features.reshape(features.shape[0], features.shape[1], -1)


def supcon_loss(features, labels=None, *, mask=None, temperature=0.07, base_temperature=0.07,
                contrast_mode="all", normalize=False, reduction="mean",
                gather_distributed=False, backend="auto", validate=True):
    """Supervised contrastive loss (Khosla et al. 2020) with SupContrast's semantics.

    ``features [B, V, ...]`` (flattened after dim 2): ``V`` views of ``B`` samples. ``labels
    [B]`` (integers) or ``mask [B, B]`` (``mask[i, j]``: weight of sample ``j`` as a positive of
    ``i``; may be asymmetric), not both; neither is SimCLR with ``V`` views (the positives of a
    row are its other views). Rows ``a`` (``V B`` anchors for ``contrast_mode="all"``, the view-0
    rows for ``"one"``) against every other row ``k != a``:

        loss_a = (T / Tb) [ LSE_{k != a} S_ak / T - (1 / |P(a)|) sum_{p in P(a)} S_ap / T ]

    (``0`` where ``|P(a)| = 0``; with a mask, ``sum_k W_ak (LSE - l_ak) / sum_k W_ak``).

    Args:
        temperature, base_temperature: ``T``, ``Tb > 0`` (SupContrast's defaults 0.07, 0.07).
        normalize: L2-normalise the rows first. ``False`` (SupContrast: the features are used as
            given; its training code normalises them before the loss).
        reduction: ``"mean"`` over every anchor (SupContrast: anchors without a positive count as
            0), ``"mean_valid"`` over the anchors with a positive (0 if none;
            pytorch-metric-learning's convention), ``"sum"`` or ``"none"`` (the per-anchor losses,
            view-major).
        gather_distributed: the candidates (and labels) of every rank; anchors stay local.
            Labels only (``mask`` and the SimCLR form index samples of one rank).
        backend, validate: as ``infonce_loss``.
    """
    mode = V.check_validate(validate)
    feats = _check_features(features, mode)
    bsz, views = feats.shape[0], feats.shape[1]
    temperature = V.check_positive("temperature", temperature)
    base_temperature = V.check_positive("base_temperature", base_temperature)
    V.check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    V.check_choice("reduction", reduction, SUPCON_REDUCTIONS)
    V.check_bool("normalize", normalize)
    V.check_bool("gather_distributed", gather_distributed)
    V.check_backend(backend)
    if labels is not None and mask is not None:
        raise ValueError("pass labels or mask, not both")
    labels = V.check_labels("labels", labels, bsz, features, mode)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor [B, B], got {type(mask).__name__}")
        if mode != "none" and (mask.dim() != 2 or tuple(mask.shape) != (bsz, bsz)):
            raise ValueError(f"mask must have shape [{bsz}, {bsz}], got {list(mask.shape)}")
        if mode != "none" and mask.device != features.device:
            raise ValueError(f"mask must be on the features' device {features.device}, got "
                             f"{mask.device}")
    ctx = distributed.context(gather_distributed)
    if ctx is not None and labels is None:
        raise ValueError("gather_distributed=True needs labels (a mask or the SimCLR form index "
                         "the samples of one rank)")
    if ctx is not None:
        distributed.check_equal_rows(bsz, features.device, ctx)
    name = resolve_backend(backend, features.device, feats.shape[2], feats.dtype)
    out_dtype = feats.dtype
    wide = compute_dtype(feats.dtype)
    with _math.autocast_off(feats.device.type):
        if name == "reference":
            return _supcon_reference(feats.to(wide), labels, mask, temperature, base_temperature,
                                     contrast_mode, normalize, reduction, ctx).to(out_dtype)
        rows = feats.to(wide)
        if normalize:
            rows = torch.nn.functional.normalize(rows, dim=2, eps=_math.NORMALIZE_EPS)
        U = torch.cat(torch.unbind(rows, dim=1))  # [V B, D], view-major
        n_local = U.shape[0]
        if labels is None and mask is None:
            labels = torch.arange(bsz, device=U.device)  # SimCLR: the class is the sample
        anchors = U if contrast_mode == "all" else U[:bsz]
        m = anchors.shape[0]
        offset = 0
        candidates = U
        if labels is not None:
            y = labels.to(torch.int64).repeat(views)
            y_all = y
            if ctx is not None:
                offset = ctx.rank * n_local
                candidates = distributed.gather_with_grad(U, ctx)
                y_all = distributed.gather_no_grad(y, ctx)
        self_index = torch.arange(m, device=U.device) + offset
        inv_temp = torch.full((m,), 1.0 / temperature, dtype=wide, device=U.device)
        no_positive = torch.full((m,), -1, dtype=torch.int64, device=U.device)
        lse = primitive.negative_lse(name, anchors,
                                     None if (contrast_mode == "all" and ctx is None)
                                     else candidates,
                                     inv_temp, no_positive, self_index, operand_dtype=out_dtype)
        if labels is not None:
            ids = dense_class_ids(y_all)
            sums, counts = class_sums(candidates, ids)
            ids_a = ids[self_index]
            npos = counts[ids_a] - 1
            pos_logits = (anchors * (sums[ids_a] - anchors)).sum(1) / temperature
        else:
            # A general mask: sum_k W_ak u_k over the tiled mask is mask[i] @ (sum over views),
            # minus the self term; a plain [B, B] x [B, D] GEMM, no softmax.
            W = mask.to(wide)
            view_sum = U.view(views, bsz, -1).sum(0)
            diag = torch.diagonal(W)
            i = torch.arange(m, device=U.device) % bsz
            weighted = (W @ view_sum)[i] - diag[i, None] * anchors
            npos = views * W.sum(1)[i] - diag[i]
            pos_logits = (anchors * weighted).sum(1) / temperature
        # SupContrast's divisor: |P|, replaced by 1 where it is (numerically) 0.
        divisor = torch.where(npos < 1e-6, torch.ones_like(npos), npos)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # no candidate at all
        per_anchor = (temperature / base_temperature) * (npos * lse - pos_logits) / divisor
        if reduction == "mean_valid":
            valid = (npos > 0).to(per_anchor.dtype)
            return (per_anchor.sum() / valid.sum().clamp_min(1)).to(out_dtype)
        return _math.reduce(per_anchor, reduction, out_dtype)


def _supcon_reference(feats, labels, mask, temperature, base_temperature, contrast_mode,
                      normalize, reduction, ctx):
    """``reference.supcon_loss``; distributed, over every rank's features (gathered with their
    gradient, as the fast path's candidates) with this rank's rows as the anchors."""
    kwargs = dict(mask=mask, temperature=temperature, base_temperature=base_temperature,
                  contrast_mode=contrast_mode, normalize=normalize, reduction=reduction)
    if ctx is None:
        return reference.supcon_loss(feats, labels, **kwargs)
    bsz, views = feats.shape[0], feats.shape[1]
    everyone = distributed.gather_with_grad(feats, ctx)
    total = everyone.shape[0]
    local = torch.arange(bsz, device=feats.device) + ctx.rank * bsz
    anchor_views = views if contrast_mode == "all" else 1
    anchors = torch.cat([local + v * total for v in range(anchor_views)])
    return reference.supcon_loss(everyone, distributed.gather_no_grad(labels, ctx),
                                 anchors=anchors, **kwargs)


def _supcon_pml(embeddings, labels, ref_emb, ref_labels, temperature, backend, validate):
    """pytorch-metric-learning's ``SupConLoss`` (``CosineSimilarity``, ``AvgNonZeroReducer``):
    rows normalised; without ``ref_emb`` every row is an anchor against every other row, with it
    against every reference row (self not excluded); ``loss_a = (|P| LSE_C - sum_P l) / (|P| +
    tiny)``; the mean over the losses ``> 0`` (0 if none); exactly 0 when the batch has no
    positive pair or no negative pair (or at most one of each)."""
    mode = V.check_validate(validate)
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a tensor [N, D], got {type(embeddings).__name__}")
    if mode != "none":
        if embeddings.dim() != 2 or not embeddings.dtype.is_floating_point:
            raise ValueError(f"embeddings must be a floating [N, D] tensor, got shape "
                             f"{list(embeddings.shape)} and dtype {embeddings.dtype}")
        if mode == "full":
            V.check_finite("embeddings", embeddings)
    if labels is None:
        raise ValueError("labels are required (indices_tuple, the miners' input, is not "
                         "supported)")
    labels = V.check_labels("labels", labels, embeddings.shape[0], embeddings, mode)
    if ref_emb is not None:
        if ref_labels is None:
            raise ValueError("ref_labels are required with ref_emb")
        if not isinstance(ref_emb, torch.Tensor) or (mode != "none" and (
                ref_emb.dim() != 2 or ref_emb.shape[1] != embeddings.shape[1])):
            raise ValueError(f"ref_emb must be [R, {embeddings.shape[1]}]")
        if mode != "none" and ref_emb.device != embeddings.device:
            raise ValueError(f"ref_emb must be on the embeddings' device {embeddings.device}")
        ref_labels = V.check_labels("ref_labels", ref_labels, ref_emb.shape[0], embeddings, mode)
    elif ref_labels is not None:
        raise ValueError("ref_labels needs ref_emb")
    name = resolve_backend(backend, embeddings.device, embeddings.shape[1], embeddings.dtype)
    out_dtype = embeddings.dtype
    wide = compute_dtype(out_dtype)
    with _math.autocast_off(embeddings.device.type):
        if name == "reference":
            return reference.supcon_pml_loss(
                embeddings.to(wide), labels.to(torch.int64),
                None if ref_emb is None else ref_emb.to(wide),
                None if ref_labels is None else ref_labels.to(torch.int64),
                temperature=temperature).to(out_dtype)
        U = _math.normalize(embeddings.to(wide))
        m = U.shape[0]
        y = labels.to(torch.int64)
        if ref_emb is None:
            R, y_ref, self_index = None, y, torch.arange(m, device=U.device)
        else:
            R, y_ref, self_index = _math.normalize(ref_emb.to(wide)), ref_labels.to(torch.int64), None
        candidates = U if R is None else R
        no_positive = torch.full((m,), -1, dtype=torch.int64, device=U.device)
        inv_temp = torch.full((m,), 1.0 / temperature, dtype=wide, device=U.device)
        lse = primitive.negative_lse(name, U, R, inv_temp, no_positive, self_index,
                                     operand_dtype=out_dtype)
        ids = dense_class_ids(torch.cat([y_ref, y]))
        ids_ref, ids_a = ids[:y_ref.shape[0]], ids[y_ref.shape[0]:]
        sums, counts = class_sums(candidates, ids_ref)
        own = 1 if R is None else 0  # the anchor itself among its class's rows
        npos = counts[ids_a] - own
        pos_logits = (U * (sums[ids_a] - own * U)).sum(1) / temperature
        n_candidates = candidates.shape[0] - (1 if R is None else 0)
        nneg = n_candidates - npos
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        per_anchor = (npos * lse - pos_logits) / (npos + torch.finfo(wide).tiny)
        # AvgNonZeroReducer: the mean of the losses > 0 (no host sync: a masked sum and count).
        above = per_anchor > 0
        loss = torch.where(above, per_anchor, torch.zeros_like(per_anchor)).sum() / \
            above.sum().clamp_min(1).to(wide)
        pos_pairs, neg_pairs = npos.sum(), nneg.sum()
        some_pairs = (pos_pairs > 0) & (neg_pairs > 0) & ((pos_pairs > 1) | (neg_pairs > 1))
        return torch.where(some_pairs, loss, torch.zeros_like(loss)).to(out_dtype)


def supcon_macl_loss(features, labels, *, temperature=0.1, alpha=0.5, a0=0.0,
                     schedule="linear", alignment="label", normalize=True, reduction="mean",
                     backend="auto", validate=True):
    """Supervised MACL (our extension; no peer defines it, docs/math.md#supervised-macl):
    every same-label pair is a positive, each with a denominator of its own that holds the
    positive and the anchor's label-negatives only (SINCERE-style), so that MACL's reweighting
    ``V (1 - P) = 1`` still cancels:

        x_ap   = LSE_{k : y_k != y_a} l_ak - l_ap,      l = S / tau(A)
        loss_a = (1/|P(a)|) sum_{p in P(a)} (1 + e^{-x_ap}) softplus(x_ap)

    ``features [B, V, ...]`` (``V`` views, rows view-major, every row an anchor), ``labels [B]``.
    ``A = sg(mean over anchors with a positive of (1/|P(a)|) sum_p S_ap)`` (``alignment="label"``,
    from class sums) or over the augmentation pairs of views 1 and 2 (``"instance"``, the
    calibration of MACL's ``a0``/``alpha``); ``tau(A)`` as ``macl_loss``. The gradient is
    ``(Q^y - Mask / |P|) / (M tau)`` exactly (the label-masked primitive plus class sums); the
    value needs one more pass over the similarity tiles (chunked, no gradient). Anchors without a
    positive, or without a label-negative, give 0. ``reduction``: ``"mean"`` (over every anchor),
    ``"sum"``, ``"none"``.
    """
    mode = V.check_validate(validate)
    feats = _check_features(features, mode)
    bsz, views = feats.shape[0], feats.shape[1]
    if labels is None:
        raise ValueError("labels are required (supcon_macl_loss defines its positives by "
                         "labels)")
    labels = V.check_labels("labels", labels, bsz, features, mode)
    temperature = V.check_positive("temperature", temperature)
    alpha, a0 = V.check_real("alpha", alpha), V.check_real("a0", a0)
    V.check_choice("schedule", schedule, V.SCHEDULES)
    if schedule == "exp" and alpha <= 0:
        raise ValueError(f"alpha must be > 0 for schedule='exp' (tau = t0 * alpha ** A), got "
                         f"{alpha}")
    V.check_choice("alignment", alignment, ("label", "instance"))
    V.check_choice("reduction", reduction, ("mean", "sum", "none"))
    V.check_bool("normalize", normalize)
    V.check_backend(backend)
    if alignment == "instance" and views < 2:
        raise ValueError("alignment='instance' needs V >= 2 views")
    name = resolve_backend(backend, features.device, feats.shape[2], feats.dtype)
    out_dtype = feats.dtype
    wide = compute_dtype(out_dtype)
    with _math.autocast_off(feats.device.type):
        if name == "reference":
            return reference.supcon_macl_loss(
                feats.to(wide), labels.to(torch.int64), temperature=temperature, alpha=alpha,
                a0=a0, schedule=schedule, alignment=alignment, normalize=normalize,
                reduction=reduction).to(out_dtype)
        rows = feats.to(wide)
        if normalize:
            rows = torch.nn.functional.normalize(rows, dim=2, eps=_math.NORMALIZE_EPS)
        U = torch.cat(torch.unbind(rows, dim=1))
        m = U.shape[0]
        y = labels.to(torch.int64).repeat(views)
        ids = dense_class_ids(y)
        sums, counts = class_sums(U, ids)
        npos = counts[ids] - 1
        pos_sum = (U * (sums[ids] - U)).sum(1)  # sum_p S_ap
        has_pos = npos > 0
        safe_npos = torch.where(has_pos, npos, torch.ones_like(npos))
        if alignment == "label":
            mean_pos = torch.where(has_pos, pos_sum / safe_npos, torch.zeros_like(pos_sum))
            A = (mean_pos.sum() / has_pos.sum().clamp_min(1)).detach()
        else:
            A = (rows[:, 0] * rows[:, 1]).sum(1).mean().detach()
        tau = _math.macl_temperature(A, temperature, alpha, a0, schedule)
        inv_temp = (1.0 / tau).expand(m)
        self_index = torch.arange(m, device=U.device)
        no_positive = torch.full((m,), -1, dtype=torch.int64, device=U.device)
        lse = primitive.negative_lse(name, U, None, inv_temp.contiguous(), no_positive,
                                     self_index, operand_dtype=out_dtype, anchor_labels=y)
        valid = has_pos & torch.isfinite(lse)
        lse_safe = torch.where(valid, lse, torch.zeros_like(lse))
        with torch.no_grad():
            value = _supcon_macl_values(U.detach(), y, lse_safe.detach(), inv_temp.detach(),
                                        safe_npos)
        # Gradient surrogate: d/d lse_negY[a] = 1, d/d l_ap = -1/|P(a)| (V sigma(x) = 1).
        surrogate = lse_safe - inv_temp * pos_sum / safe_npos
        per_anchor = value + (surrogate - surrogate.detach())
        per_anchor = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
        return _math.reduce(per_anchor, reduction, out_dtype)


# The value pass's tile: at most this many logits at once (2M: 8 MiB in float32).
VALUE_TILE_ELEMENTS = 1 << 21


def value_chunk_rows(rows: int, columns: int) -> int:
    """Anchor rows per chunk of the value pass: a ``chunk x columns`` tile of at most
    ``VALUE_TILE_ELEMENTS`` logits, at least one row."""
    return max(1, min(rows, VALUE_TILE_ELEMENTS // max(1, columns)))


def _supcon_macl_values(U, y, lse, inv_temp, npos):
    """``(1/|P(a)|) sum_p (1 + e^{-x_ap}) softplus(x_ap)`` by chunks of anchor rows (one more
    pass over the similarity tiles, ``O(chunk K)`` memory)."""
    m = U.shape[0]
    out = U.new_zeros(m)
    chunk = value_chunk_rows(m, m)
    for r0 in range(0, m, chunk):
        r = slice(r0, min(m, r0 + chunk))
        logits = (U[r] @ U.T) * inv_temp[r, None]
        positive = y[r, None] == y[None, :]
        positive[torch.arange(r.stop - r.start, device=U.device),
                 torch.arange(r.start, r.stop, device=U.device)] = False
        x = lse[r, None] - logits
        values = torch.where(positive, _math.macl_value(torch.where(positive, x,
                                                                    torch.zeros_like(x))),
                             torch.zeros_like(x))
        out[r] = values.sum(1) / npos[r]
    return out
