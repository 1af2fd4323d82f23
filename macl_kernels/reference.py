"""Pure-PyTorch reference of every loss of ``docs/math.md``: the oracle every backend is tested
against.

Written to read like the math, not to be fast: it materialises the full ``M x K`` similarity
matrix, masks it, and lets autograd produce the gradients (including the stop-gradients the
losses prescribe). It works in any floating dtype; half inputs are computed in float32.

It is the whole oracle: the pair losses, MoCo, SigLIP, the supervised losses (SupContrast's and
pytorch-metric-learning's SupCon, supervised MACL) and SogCLR's step. It imports nothing from the
package and shares no helper with the fast path, so a bug in a shared helper cannot pass the
backend-vs-reference tests; ``backend="reference"`` of every loss calls the function here.

Notation (``docs/math.md#notation``, ``#layouts``): ``u = normalize(z)``; each layout turns
``(u1, u2)`` into a matrix ``S`` whose row ``a`` holds anchor ``a``'s similarities to its
candidates, a boolean mask of the candidate set ``C(a)`` (all but self) and the column ``p(a)``
of its positive. ``Neg(a) = C(a)`` without ``p(a)``.
"""

from __future__ import annotations

import math

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

NORMALIZE_EPS = 1e-12  # F.normalize's default: u = z / max(||z||, eps)
MACL_TEMPERATURE_FLOOR = 1e-3  # tau(A) is clamped here (or at tau0 if smaller), docs/math.md#macl


class AnchorRows(NamedTuple):
    """Row ``a`` of ``S`` is anchor ``a``; ``candidates[a, k]`` says whether ``k`` is in ``C(a)``."""

    S: torch.Tensor  # [M, K] similarities
    candidates: torch.Tensor  # [M, K] bool, C(a)
    positive: torch.Tensor  # [M] long, p(a)

    @property
    def positive_similarity(self) -> torch.Tensor:
        return self.S.gather(1, self.positive[:, None])[:, 0]

    @property
    def Y(self) -> torch.Tensor:
        """Positive indicator ``Y[a, k] = [k == p(a)]``."""
        return F.one_hot(self.positive, self.S.shape[1]).bool()

    @property
    def negatives(self) -> torch.Tensor:
        return self.candidates & ~self.Y


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^x)`` to full precision (``F.softplus`` switches to ``x`` above 20, an error of
    ``e^-20`` ~ 2e-9 that would show in float64 comparisons)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are computed in float32 or wider."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(z: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    z = z.to(compute_dtype(z.dtype))
    return F.normalize(z, p=2.0, dim=1, eps=NORMALIZE_EPS) if normalize else z


def anchor_rows(u1: torch.Tensor, u2: torch.Tensor, layout: str,
                negatives: Optional[torch.Tensor] = None) -> AnchorRows:
    """``negatives`` (extra candidate rows, normalised like ``u1``) are extra columns of every
    anchor in ``2n`` and ``cross``, and of the ``u1`` anchors only in ``cross_sym``."""
    n = u1.shape[0]
    device = u1.device
    extra = 0 if negatives is None else negatives.shape[0]
    if layout == "2n":
        # SimCLR / NT-Xent: U = [u1; u2], every row is an anchor, its positive is the other view.
        U = torch.cat([u1, u2])
        C = U if negatives is None else torch.cat([U, negatives])
        S = U @ C.T
        M = 2 * n
        is_self = torch.eye(M, M + extra, dtype=torch.bool, device=device)
        positive = (torch.arange(M, device=device) + n) % M
        return AnchorRows(S, ~is_self, positive)
    C2 = u2 if negatives is None else torch.cat([u2, negatives])
    S = u1 @ C2.T
    everyone = torch.ones(n, n + extra, dtype=torch.bool, device=device)
    diagonal = torch.arange(n, device=device)
    if layout == "cross":
        # SimCSE / GraphCL: anchors u1, candidates u2, positive on the diagonal.
        return AnchorRows(S, everyone, diagonal)
    if layout == "cross_sym":
        # CLIP: the N rows of S, then the N columns (rows of S^T), each a cross-entropy; the
        # columns' rows get zero-padded, masked-out columns for the extra negatives.
        columns = torch.cat([S[:, :n].T, S.new_zeros(n, extra)], dim=1)
        column_mask = torch.cat([everyone[:, :n], everyone.new_zeros(n, extra)], dim=1)
        return AnchorRows(
            torch.cat([S, columns]), torch.cat([everyone, column_mask]),
            torch.cat([diagonal, diagonal])
        )
    raise ValueError(f"layout must be one of ['2n', 'cross', 'cross_sym'], got {layout!r}")


def label_masked(rows: AnchorRows, labels: Optional[torch.Tensor], layout: str) -> AnchorRows:
    """False-negative masking (docs/math.md#label-masked-negatives): every candidate of the
    anchor's label leaves ``C(a)`` (the positive stays the positive, its logit is read apart)."""
    if labels is None:
        return rows
    y = labels.to(rows.S.device)
    anchor_labels = y if layout == "cross" else torch.cat([y, y])
    column_labels = torch.cat([y, y]) if layout == "2n" else y
    same = anchor_labels[:, None] == column_labels[None, :]
    return AnchorRows(rows.S, rows.candidates & ~same, rows.positive)


def without_empty_rows(loss_fn, rows: AnchorRows, logits: torch.Tensor):
    """``loss_fn(rows, logits)`` with rows whose ``Neg(a)`` is empty (every candidate masked by a
    label) given loss 0 and no gradient, instead of an LSE over nothing."""
    has_negative = rows.negatives.any(dim=1)
    first = torch.zeros_like(rows.candidates)
    first[:, 0] = True
    safe = AnchorRows(rows.S, torch.where(has_negative[:, None], rows.candidates, first | ~rows.Y),
                      rows.positive)
    loss = loss_fn(safe, logits)
    return torch.where(has_negative, loss, torch.zeros_like(loss))


def masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)


def reduce(per_anchor: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "mean":
        out = per_anchor.mean()
    elif reduction == "sum":
        out = per_anchor.sum()
    elif reduction == "none":
        out = per_anchor
    else:
        raise ValueError(f"reduction must be one of ['mean', 'sum', 'none'], got {reduction!r}")
    return out.to(dtype)


def negative_log_p_positive(rows: AnchorRows, logits: torch.Tensor) -> torch.Tensor:
    """``-log P_ap`` with ``P`` the softmax of row ``a`` over ``C(a)``, written as
    ``softplus(x_a)``, ``x_a = LSE_{k in Neg(a)} l_ak - l_ap`` (the same number: ``1/P_ap =
    1 + sum_Neg e^(l_ak - l_ap)``). Autograd of this form gives ``P - Y`` without the
    cancellation of ``softmax - 1`` at a confident positive, so the oracle stays exact in float64.
    """
    return softplus(negative_margin(rows, logits))


def negative_margin(rows: AnchorRows, logits: torch.Tensor) -> torch.Tensor:
    """``x_a = LSE_{k in Neg(a)} l_ak - l_ap``; ``-log P_ap = softplus(x_a)``, ``1 - P_ap = sigmoid(x_a)``."""
    positive_logit = logits.gather(1, rows.positive[:, None])[:, 0]
    return masked_logsumexp(logits, rows.negatives) - positive_logit


# --------------------------------------------------------------------------------------------
# The losses (docs/math.md, one section each)
# --------------------------------------------------------------------------------------------


def infonce_loss(z1, z2, *, temperature=0.1, layout="2n", normalize=True, reduction="mean",
                 negatives=None, labels=None):
    """NT-Xent / InfoNCE: ``loss_a = -log P_ap``, ``l_ak = S_ak / tau``; ``labels``: same-label
    candidates are not negatives."""
    rows = anchor_rows(_n(z1, normalize), _n(z2, normalize), layout, _neg(negatives, z1, normalize))
    if labels is not None:
        rows = label_masked(rows, labels, layout)
        loss = without_empty_rows(negative_log_p_positive, rows, rows.S / temperature)
        return reduce(loss, reduction, z1.dtype)
    return reduce(negative_log_p_positive(rows, rows.S / temperature), reduction, z1.dtype)


def clip_loss(image_features, text_features, logit_scale, *, normalize=True, reduction="mean",
              negatives=None):
    """CLIP: ``l_ij = s * S_ij`` over both directions; ``s`` may require grad."""
    rows = anchor_rows(_n(image_features, normalize), _n(text_features, normalize), "cross_sym",
                       _neg(negatives, image_features, normalize))
    if isinstance(logit_scale, torch.Tensor):
        logit_scale = logit_scale.to(rows.S.dtype).reshape(())
    loss = negative_log_p_positive(rows, logit_scale * rows.S)
    return reduce(loss, reduction, image_features.dtype)


def dcl_weights(u1: torch.Tensor, u2: torch.Tensor, sigma: float) -> torch.Tensor:
    """DCLW's negative von Mises-Fisher weights ``w_i = 2 - N softmax_i(u1_i . u2_i / sigma)`` (sg)."""
    u1, u2 = u1.detach(), u2.detach()
    return 2 - u1.shape[0] * torch.softmax((u1 * u2).sum(1) / sigma, dim=0)


def per_anchor_pair_values(values_per_pair: torch.Tensor, layout: str) -> torch.Tensor:
    """Pair ``i``'s value for every anchor row of the layout (2n and cross_sym have each pair twice)."""
    return values_per_pair if layout == "cross" else torch.cat([values_per_pair, values_per_pair])


def dcl_loss(
    z1, z2, *, temperature=0.1, weighted=False, sigma=0.5, layout="2n", normalize=True,
    reduction="mean", weights: Optional[torch.Tensor] = None, negatives=None, labels=None,
):
    """Decoupled CL: ``loss_a = -w_a l_ap + LSE_{k in Neg(a)} l_ak`` (``w = 1`` unless weighted).

    ``weights`` (one per anchor row) overrides ``weighted``; it is how lightly's ``weight_fn``
    reaches the reference.
    """
    u1, u2 = _n(z1, normalize), _n(z2, normalize)
    rows = label_masked(anchor_rows(u1, u2, layout, _neg(negatives, z1, normalize)), labels,
                        layout)
    logits = rows.S / temperature
    if weights is None:
        weights = (
            per_anchor_pair_values(dcl_weights(u1, u2, sigma), layout)
            if weighted
            else torch.ones_like(rows.positive, dtype=logits.dtype)
        )

    def per_row(r, lg):
        positive_logit = lg.gather(1, r.positive[:, None])[:, 0]
        return -weights * positive_logit + masked_logsumexp(lg, r.negatives)

    loss = per_row(rows, logits) if labels is None else without_empty_rows(per_row, rows, logits)
    return reduce(loss, reduction, z1.dtype)


def macl_temperature(A, temperature: float, alpha: float, a0: float, schedule: str):
    """MACL's model-aware temperature ``tau(A)``, clamped at a positive floor (never a sign flip)."""
    if schedule == "linear":
        tau = temperature * (1 + alpha * (A - a0))
    elif schedule == "exp":
        tau = temperature * torch.pow(torch.as_tensor(alpha, dtype=A.dtype, device=A.device), A)
    else:
        raise ValueError(f"schedule must be one of ['linear', 'exp'], got {schedule!r}")
    return tau.clamp_min(min(MACL_TEMPERATURE_FLOOR, temperature))


def macl_loss(
    z1, z2, *, temperature=0.1, alpha=0.5, a0=0.0, schedule="linear", temperature_mode="batch",
    reweight=True, layout="2n", normalize=True, reduction="mean", return_stats=False,
    negatives=None, labels=None,
):
    """Model-Aware Contrastive Learning (ICML 2023).

    ``A = sg(mean_a S_a,p(a))`` (or per anchor), ``tau = tau(A)``, ``l = S / tau``,
    ``loss_a = -sg(V_a) log P_ap`` with ``V_a = 1 / (1 - P_ap) = 1 / sigmoid(x_a)``.
    """
    rows = anchor_rows(_n(z1, normalize), _n(z2, normalize), layout,
                       _neg(negatives, z1, normalize))
    alignment = rows.positive_similarity.detach()
    if temperature_mode == "batch":
        alignment = alignment.mean()
    elif temperature_mode != "anchor":
        raise ValueError(
            f"temperature_mode must be one of ['batch', 'anchor'], got {temperature_mode!r}"
        )
    tau = macl_temperature(alignment, temperature, alpha, a0, schedule)
    logits = rows.S / (tau[:, None] if tau.dim() == 1 else tau)

    def per_row(r, lg):
        x = negative_margin(r, lg)
        return _macl_reweighted(x) if reweight else softplus(x)

    # labels: A stays over the instance pairs; only the denominators lose same-label rows.
    loss = per_row(rows, logits) if labels is None else without_empty_rows(
        per_row, label_masked(rows, labels, layout), logits)
    out = reduce(loss, reduction, z1.dtype)
    return (out, tau.detach(), alignment) if return_stats else out


def _macl_reweighted(x: torch.Tensor) -> torch.Tensor:
    """``sg(V) * (-log P_ap)`` with ``V = 1 / (1 - P_ap) = 1 / sigmoid(x)`` (no cancellation).

    Where ``e^x`` is below the dtype's rounding (``P_ap`` is 1 in floating point, as with very
    low temperatures) ``V`` overflows while ``-log P_ap = softplus(x)`` underflows to 0, and
    ``inf * 0`` would be NaN. There the product is ``(1 + e^-x) log(1 + e^x) = 1 + e^x / 2 + ...``,
    which is 1 to rounding, and its gradient ``sg(V) sigmoid(x)`` is exactly 1: the tail is
    written as ``1 + (x - sg(x))``. The formula sees a harmless 0 there, so that ``torch.where``
    back-propagates no NaN from the branch it does not take.
    """
    tail = x < math.log(torch.finfo(x.dtype).eps)
    x_body = torch.where(tail, torch.zeros_like(x), x)
    V = 1 / torch.sigmoid(x_body)
    body = V.detach() * softplus(x_body)
    return torch.where(tail, 1 + (x - x.detach()), body)


def tfree_loss(z1, z2, *, scale=2.0, eps=1e-6, layout="2n", normalize=True, reduction="mean",
               negatives=None):
    """Temperature-free InfoNCE: ``l_ak = c * artanh(clamp(S_ak, -1 + e, 1 - e))``."""
    rows = anchor_rows(_n(z1, normalize), _n(z2, normalize), layout,
                       _neg(negatives, z1, normalize))
    # Self (S_aa ~ 1, artanh -> inf) is masked out before the map is used.
    S = rows.S.masked_fill(~rows.candidates, 0.0)
    logits = scale * torch.atanh(S.clamp(-1 + eps, 1 - eps))
    return reduce(negative_log_p_positive(rows, logits), reduction, z1.dtype)


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, normalize=True,
                reduction="mean", positive_offset: int = 0):
    """SigLIP: ``l_ij = t S_ij + b``, labels ``y_ij = +1`` on the positive ``j = i +
    positive_offset`` and ``-1`` elsewhere; per image row ``r_i = sum_j softplus(-y_ij l_ij)``
    over every text; ``"mean"`` is ``(1/B) sum_i r_i`` (OpenCLIP's ``SigLipLoss``). More texts
    than images are extra negatives; ``positive_offset`` places the positives among gathered
    texts (``rank * K`` in the distributed loss). ``t`` and ``b`` may require grad."""
    u1, u2 = _n(image_features, normalize), _n(text_features, normalize)
    if isinstance(logit_scale, torch.Tensor):
        logit_scale = logit_scale.to(u1.dtype).reshape(())
    if isinstance(logit_bias, torch.Tensor):
        logit_bias = logit_bias.to(u1.dtype).reshape(())
    logits = logit_scale * (u1 @ u2.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    B, K = logits.shape
    labels = -torch.ones(B, K, dtype=logits.dtype, device=logits.device)
    rows = torch.arange(B, device=logits.device)
    labels[rows, rows + positive_offset] = 1.0
    per_image = softplus(-labels * logits).sum(dim=1)
    return reduce(per_image, reduction, image_features.dtype)


def _n(z: torch.Tensor, do_normalize: bool) -> torch.Tensor:
    return normalize(z, do_normalize)


def _neg(negatives: Optional[torch.Tensor], like: torch.Tensor, do_normalize: bool):
    """Extra candidate rows in the embeddings' compute dtype, normalised like them."""
    if negatives is None:
        return None
    return normalize(negatives.to(compute_dtype(like.dtype)), do_normalize)


def moco_loss(query, key, bank, *, temperature=0.1, loss="infonce", tau=None,
              in_batch_negatives=False, normalize=True, reduction="mean"):
    """MoCo / lightly memory bank, written as lightly writes it: logits ``[l_pos, l_bank]`` (and
    the other keys with ``in_batch_negatives``) over ``tau`` (MACL: the given ``tau(A)``), the
    positive in column 0. ``loss``: ``"infonce"`` (cross-entropy), ``"dcl"`` (the LSE over the
    negatives minus ``l_pos``), ``"macl"`` (``sg(V) (-log P)``, ``V = 1 / (1 - P)``)."""
    q, k = _n(query, normalize), _n(key, normalize)
    B = bank.to(device=q.device, dtype=q.dtype)
    negatives = q @ B.T
    if in_batch_negatives:
        S_keys = q @ k.T
        off_diagonal = ~torch.eye(q.shape[0], dtype=torch.bool, device=q.device)
        negatives = torch.cat([S_keys[off_diagonal].view(q.shape[0], -1), negatives], dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), negatives], dim=1)
    logits = logits / (tau if tau is not None else temperature)
    if loss == "infonce":
        per_anchor = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long,
                                                         device=q.device), reduction="none")
    elif loss == "dcl":
        per_anchor = torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]
    elif loss == "macl":
        per_anchor = _macl_reweighted(torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0])
    else:
        raise ValueError(f"loss must be one of ['infonce', 'dcl', 'macl'], got {loss!r}")
    return reduce(per_anchor, reduction, query.dtype)



# --------------------------------------------------------------------------------------------
# Losses with label or view positives (docs/math.md#supervised-contrastive-supcon), SogCLR
# --------------------------------------------------------------------------------------------


def _view_major_rows(features: torch.Tensor, do_normalize: bool) -> torch.Tensor:
    """``features [B, V, ...]`` as the ``V B`` rows ``[u^1; ...; u^V]`` (row ``v B + i``)."""
    feats = features.reshape(features.shape[0], features.shape[1], -1)
    rows = torch.cat(torch.unbind(feats, dim=1))
    return normalize(rows, do_normalize)


def _safe_candidates(candidates: torch.Tensor) -> torch.Tensor:
    """A row whose candidate set is empty gets every column instead, so that its LSE (which its
    zero weights then ignore) and that LSE's gradient stay finite."""
    return candidates | ~candidates.any(dim=1, keepdim=True)


def supcon_loss(features, labels=None, *, mask=None, temperature=0.07, base_temperature=0.07,
                contrast_mode="all", normalize=False, reduction="mean", anchors=None):
    """SupContrast's supervised contrastive loss. Rows view-major, ``l_ak = S_ak / T``,
    ``C(a) = {k != a}``, positive weights ``W_ak`` (``[y_k = y_a]``, the tiled ``mask``, or, with
    neither, ``[k is a view of a's sample]``; self removed)::

        loss_a = (T / Tb) sum_k W_ak (LSE_{C(a)} l_a - l_ak) / d_a,   d_a = sum_k W_ak (1 if < 1e-6)

    ``reduction``: ``"mean"``, ``"sum"``, ``"none"`` over the anchors, ``"mean_valid"`` over the
    anchors with ``d_a > 0``. ``anchors`` (row indices, view-major): the anchor rows, in order;
    default every row (``contrast_mode="all"``) or the first view's (``"one"``). The distributed
    loss passes every rank's features and its own rows here."""
    B, V = features.shape[0], features.shape[1]
    U = _view_major_rows(features, normalize)
    n = U.shape[0]
    if anchors is None:
        anchors = torch.arange(n if contrast_mode == "all" else B, device=U.device)
    logits = U[anchors] @ U.T / temperature
    m = logits.shape[0]
    not_self = torch.ones(m, n, dtype=torch.bool, device=U.device)
    not_self[torch.arange(m, device=U.device), anchors] = False
    if mask is not None:
        W = mask.to(U.dtype).repeat(V, V)[anchors]
    else:
        y = (labels if labels is not None else torch.arange(B, device=U.device)).repeat(V)
        W = (y[anchors, None] == y[None, :]).to(U.dtype)
    W = W * not_self
    lse = masked_logsumexp(logits, _safe_candidates(not_self))
    weight = W.sum(dim=1)
    divisor = torch.where(weight < 1e-6, torch.ones_like(weight), weight)
    per_anchor = (temperature / base_temperature) * (W * (lse[:, None] - logits)).sum(1) / divisor
    if reduction == "mean_valid":
        valid = (weight > 0).sum()
        return (per_anchor.sum() / valid.clamp_min(1)).to(features.dtype)
    return reduce(per_anchor, reduction, features.dtype)


def supcon_pml_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1):
    """pytorch-metric-learning's ``SupConLoss`` (cosine similarity, ``AvgNonZeroReducer``).
    ``l_ak = u_a . r_k / T`` against every reference row (``ref_emb``; default the embeddings
    themselves, self left out); ``P(a)``: the candidates of ``a``'s label::

        loss_a = (|P(a)| LSE_{C(a)} l_a - sum_{P(a)} l_ap) / (|P(a)| + tiny)

    The loss is the mean of the ``loss_a > 0`` (0 if none), and exactly 0 when the batch has no
    positive pair, no negative pair, or one of each at most."""
    u = normalize(embeddings)
    if ref_emb is None:
        r, y_ref = u, labels
    else:
        r, y_ref = normalize(ref_emb.to(u.dtype)), ref_labels
    logits = u @ r.T / temperature
    candidates = torch.ones_like(logits, dtype=torch.bool)
    if ref_emb is None:
        candidates.fill_diagonal_(False)
    positive = (labels[:, None] == y_ref[None, :]) & candidates
    negative = candidates & ~positive
    lse = masked_logsumexp(logits, _safe_candidates(candidates))
    npos = positive.sum(dim=1).to(u.dtype)
    pos_sum = torch.where(positive, logits, torch.zeros_like(logits)).sum(dim=1)
    per_anchor = (npos * lse - pos_sum) / (npos + torch.finfo(u.dtype).tiny)
    above = per_anchor > 0
    loss = torch.where(above, per_anchor, torch.zeros_like(per_anchor)).sum() / \
        above.sum().clamp_min(1).to(u.dtype)
    pos_pairs, neg_pairs = positive.sum(), negative.sum()
    some_pairs = (pos_pairs > 0) & (neg_pairs > 0) & ((pos_pairs > 1) | (neg_pairs > 1))
    return torch.where(some_pairs, loss, torch.zeros_like(loss)).to(embeddings.dtype)


def supcon_macl_loss(features, labels, *, temperature=0.1, alpha=0.5, a0=0.0,
                     schedule="linear", alignment="label", normalize=True, reduction="mean"):
    """Supervised MACL (docs/math.md#supervised-macl): every same-label pair ``(a, p)`` a
    positive with a denominator of its own (``p`` and the label-negatives of ``a``)::

        x_ap   = LSE_{k : y_k != y_a} l_ak - l_ap,        l = S / tau(A)
        loss_a = (1/|P(a)|) sum_{p in P(a)} sg(V_ap) (-log P_ap),   V_ap = 1 / (1 - P_ap)

    ``A = sg(mean over anchors with a positive of mean_{P(a)} S_ap)`` (``"label"``) or
    ``sg(mean_i u^1_i . u^2_i)`` (``"instance"``). Anchors without a positive or without a
    label-negative give 0."""
    B, V = features.shape[0], features.shape[1]
    U = _view_major_rows(features, normalize)
    y = labels.repeat(V)
    S = U @ U.T
    same = y[:, None] == y[None, :]
    positive = same & ~torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    negative = ~same
    npos = positive.sum(dim=1)
    has_pos = npos > 0
    if alignment == "label":
        mean_pos = torch.where(positive, S, torch.zeros_like(S)).sum(1) / npos.clamp_min(1)
        A = (mean_pos * has_pos).sum() / has_pos.sum().clamp_min(1)
    else:
        A = (U[:B] * U[B:2 * B]).sum(dim=1).mean()
    tau = macl_temperature(A.detach(), temperature, alpha, a0, schedule)
    logits = S / tau
    lse = masked_logsumexp(logits, _safe_candidates(negative))
    x = lse[:, None] - logits
    pair = torch.where(positive, _macl_reweighted(torch.where(positive, x, torch.zeros_like(x))),
                       torch.zeros_like(x))
    valid = has_pos & negative.any(dim=1)
    per_anchor = torch.where(valid, pair.sum(1) / npos.clamp_min(1), torch.zeros_like(lse))
    return reduce(per_anchor, reduction, features.dtype)


def gcl_loss(hidden1, hidden2, tau, u, gamma, *, eps, rho=0.0, offset=0):
    """LibAUC's ``GCLoss_v1`` (SogCLR / iSogCLR, docs/math.md#sogclr-and-isogclr), one step,
    written as LibAUC writes it. ``hidden1, hidden2 [N, D]``: the batch (every rank's rows when
    distributed); the anchors are the ``B`` samples from ``offset`` on, both views (``2B``
    rows: ``B`` first views, then ``B`` second views), each against the ``2N - 2`` rows that are
    neither itself nor its other view. ``tau [B]``: the samples' temperatures; ``u [B]``: their
    moving averages before the step; ``gamma``: the step's weight of the new estimate::

        e_ak   = exp(S_ak / tau_a)            (k in Neg(a))
        ubar_a = (1 - gamma) u_a + gamma mean_k e_ak
        w_ak   = sg(e_ak / max(ubar_a, eps))
        loss   = (1/B) sum_a ( mean_k w_ak S_ak - S_a,p(a) )
        dtau_a = log ubar_a + rho - mean_k w_ak S_ak / tau_a

    Returns ``(loss, ubar [2B], dtau [2B])`` (``ubar`` and ``dtau`` without gradient). The
    exponentials are taken relative to the row's LSE (``e_ak / sum_k e_ak`` is a softmax), so
    ``1 / tau > 88`` does not overflow where LibAUC's float32 would."""
    U_all = torch.cat([normalize(hidden1), normalize(hidden2)])
    N = hidden1.shape[0]
    B = u.shape[0]
    local = torch.arange(B, device=U_all.device) + offset
    rows = torch.cat([local, local + N])  # the anchors among U_all
    partner = torch.cat([local + N, local])
    S = U_all[rows] @ U_all.T
    M = S.shape[0]
    negatives = torch.ones_like(S, dtype=torch.bool)
    every = torch.arange(M, device=S.device)
    negatives[every, rows] = False
    negatives[every, partner] = False
    n_neg = 2 * N - 2
    b = 1.0 / torch.cat([tau, tau]).to(S.dtype).detach()
    logits = S * b[:, None]
    lse = masked_logsumexp(logits, negatives)
    mean_e = torch.exp(lse - math.log(n_neg))  # mean_k e_ak
    u_bar = ((1 - gamma) * torch.cat([u, u]).to(S.dtype) + gamma * mean_e).detach()
    softmax = torch.exp(logits - lse[:, None]).masked_fill(~negatives, 0.0)
    w_mean = (softmax * (mean_e / u_bar.clamp_min(eps))[:, None]).detach()  # w_ak / n_neg
    weighted = (w_mean * S).sum(dim=1)
    loss = (weighted - S[every, partner]).sum() / B
    d_tau = (torch.log(u_bar) + rho - weighted.detach() * b).detach()
    return loss, u_bar, d_tau
