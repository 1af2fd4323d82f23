"""Backend ``"torch"``: the primitive (``docs/math.md#the-primitive``) in pure PyTorch, chunked
over anchor rows.

Forward walks ``chunk`` anchor rows at a time, keeps only ``lse_neg`` (``M`` floats) and frees
each ``chunk x K`` tile of logits. Backward recomputes the tile and forms, from the saved
``lse_neg`` and the upstream gradient ``g``,

    dL_dl_ak = g_a Q_ak,   Q_ak = exp(l_ak - lse_neg[a])   (0 off Neg(a))

``LogitMap.SCALED``: ``l = diag(inv_temp) S``, so the row scale rides on the ``chunk x D``
operands instead of costing a pass over the ``chunk x K`` tile:

    logits        = (inv_temp * anchors) @ candidates^T
    d_anchors     = inv_temp * (dL_dl @ candidates)
    d_candidates += dL_dl^T @ (inv_temp * anchors)
    d_inv_temp_a  = sum_k dL_dl_ak S_ak = anchors[a] . (dL_dl @ candidates)[a]

``LogitMap.ARTANH``: ``dL_dS = dL_dl * dl_dS`` with ``dl_dS = artanh_scale / (1 - S^2)`` (0 where
clamped), then the same two GEMMs.

``RowReduction.SOFTPLUS`` (SigLIP): ``l = (inv_temp * anchors) @ candidates^T + row_bias``, the
row sums of ``softplus(l)`` over ``Neg(a)`` in forward; backward needs no statistic:
``dL_dl = g_a sigmoid(l_ak)`` (0 off ``Neg(a)``), the same GEMMs, ``d_row_bias_a = sum_k dL_dl_ak``.

A symmetric problem (the candidates are the anchors) runs as a cross one against the same rows
and returns both sides; ``_ops`` folds them. A both-directions problem (layout ``cross_sym``)
computes each chunk of ``S`` once for its rows and for the columns (``forward_lse_both``).

Extra memory: O((M + K) * D + chunk * K), never O(M * K). Works on any device and dtype the
matmul supports; the losses pass float32 or float64 (half inputs are upcast by the caller).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..protocol import Backend, Capabilities, Grads, LogitMap, Needs, Problem, RowReduction

# Elements per chunk x K tile: 2M fp32 elements = 8 MiB per live tile. Measured on the 2-core
# x86 CI machine, MACL 2n, 2N = 8192, D = 128, forward+backward: 2**20 / 2**21 / 2**23 took
# about 1.0 / 0.9 / 1.15 s with 50-77 / 61-72 / 97-115 MB peak RSS growth; larger tiles only
# cost memory (allocator caching grows with the tile), much smaller ones pay per-chunk overhead.
TILE_ELEMENTS = 1 << 21


def default_chunk(num_rows: int, num_candidates: int) -> int:
    return max(1, min(num_rows, TILE_ELEMENTS // max(1, num_candidates)))


def _exclude(logits, rows, pos_index, self_index, anchor_labels=None, candidate_labels=None):
    """Drop the positive and self from the candidate set (Neg(a)), by index, not by a big constant.
    A negative ``pos_index`` means no positive among the candidates (nothing to drop): written
    with ``where`` on the gathered column, not a boolean mask, so that no host sync is needed.
    With labels, every candidate of the anchor's label goes too."""
    if anchor_labels is not None:
        logits.masked_fill_(anchor_labels[rows, None] == candidate_labels[None, :], float("-inf"))
    pos = pos_index[rows, None]
    col = pos.clamp_min(0)
    kept = logits.gather(1, col)
    logits.scatter_(1, col, torch.where(pos < 0, kept, torch.full_like(kept, float("-inf"))))
    if self_index is not None:
        logits.scatter_(1, self_index[rows, None], float("-inf"))
    return logits


def _logits(problem: Problem, rows: slice):
    """The logits tile of anchor rows ``rows``, and ``S`` when the artanh map needs it again in
    backward."""
    anchors, candidates = problem.anchors[rows], problem.candidate_rows
    if problem.logit_map is LogitMap.SCALED:
        return (anchors * problem.inv_temp[rows, None]) @ candidates.T, None
    S = anchors @ candidates.T
    eps = problem.artanh_eps
    return torch.atanh(S.clamp(-1 + eps, 1 - eps)).mul_(problem.artanh_scale), S


def _softplus_logits(problem: Problem, rows: slice):
    """``l = inv_temp[a] S_ak + row_bias[a]`` of anchor rows ``rows`` (RowReduction.SOFTPLUS)."""
    logits = (problem.anchors[rows] * problem.inv_temp[rows, None]) @ problem.candidate_rows.T
    if problem.row_bias is not None:
        logits += problem.row_bias[rows, None]
    return logits


def _drop(values, rows, pos_index, self_index):
    """Zero the positive's and self's entries (not in Neg(a)) of a softplus or sigmoid tile."""
    values.scatter_(1, pos_index[rows, None], 0.0)
    if self_index is not None:
        values.scatter_(1, self_index[rows, None], 0.0)
    return values


def stable_softplus_(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) = max(x, 0) + log1p(exp(-|x|))`` in place: exact at any ``x`` (no overflow at
    ``|x| = 1e4``, no threshold like ``F.softplus``'s)."""
    tail = x.abs().neg_().exp_().log1p_()
    return x.clamp_min_(0.0).add_(tail)


def forward_softplus(problem: Problem, chunk: int) -> torch.Tensor:
    sp_neg = problem.anchors.new_empty(problem.M)
    for r0 in range(0, problem.M, chunk):
        rows = slice(r0, min(problem.M, r0 + chunk))
        sp = stable_softplus_(_softplus_logits(problem, rows))
        sp_neg[rows] = _drop(sp, rows, problem.pos_index, problem.self_index).sum(dim=1)
    return sp_neg


def backward_softplus(problem: Problem, g: torch.Tensor, needs: Needs, chunk: int) -> Grads:
    anchors, candidates, inv_temp = problem.anchors, problem.candidate_rows, problem.inv_temp
    d_anchors = torch.zeros_like(anchors) if needs.d_anchors else None
    d_candidates = torch.zeros_like(candidates) if needs.d_candidates else None
    d_inv_temp = torch.zeros_like(inv_temp) if needs.d_inv_temp else None
    need_d_row_bias = needs.d_row_bias and problem.row_bias is not None
    d_row_bias = torch.zeros_like(problem.row_bias) if need_d_row_bias else None
    for r0 in range(0, problem.M, chunk):
        rows = slice(r0, min(problem.M, r0 + chunk))
        a = anchors[rows]
        # dL_dl = g_a sigmoid(l_ak) on Neg(a), built in the logits' storage.
        dL_dl = _drop(_softplus_logits(problem, rows).sigmoid_(), rows, problem.pos_index,
                      problem.self_index).mul_(g[rows, None])
        if d_row_bias is not None:
            d_row_bias[rows] = dL_dl.sum(dim=1)
        inv_temp_rows = inv_temp[rows, None]
        if d_anchors is not None or d_inv_temp is not None:
            dL_dl_candidates = dL_dl @ candidates
            if d_anchors is not None:
                d_anchors[rows] = dL_dl_candidates * inv_temp_rows
            if d_inv_temp is not None:
                d_inv_temp[rows] = (dL_dl_candidates * a).sum(dim=1)
        if d_candidates is not None:
            d_candidates.addmm_(dL_dl.T, a * inv_temp_rows)
    return Grads(d_anchors, d_candidates, d_inv_temp, d_row_bias)


def _exclude_problem(logits, rows, problem: Problem):
    return _exclude(logits, rows, problem.pos_index, problem.self_index, problem.anchor_labels,
                    problem.candidate_label_rows)


def forward_lse(problem: Problem, chunk: int, need_eqs: bool = False):
    """``lse_neg``; with ``need_eqs`` also the per-row statistic ``eqs[a] = sum_k Q_ak S_ak``."""
    lse_neg = problem.anchors.new_empty(problem.M)
    eqs = problem.anchors.new_empty(problem.M) if need_eqs else None
    for r0 in range(0, problem.M, chunk):
        rows = slice(r0, min(problem.M, r0 + chunk))
        logits, _ = _logits(problem, rows)
        _exclude_problem(logits, rows, problem)
        # In-place log-sum-exp: the tile is dead after this, so reuse its storage.
        # A row with an empty Neg(a) (all -inf) shifts by 0, not -inf: its sum is then 0 and
        # lse_neg = -inf, never -inf - -inf = NaN.
        row_max = logits.amax(dim=1)
        row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
        weights = logits.sub_(row_max[:, None]).exp_()
        row_sum = weights.sum(dim=1)
        lse_neg[rows] = row_max + row_sum.log()
        if need_eqs:
            # sum_k e^(l - m) S_ak / sum_k e^(l - m): the tile's S is gone (the logits were
            # built in its place), so sum_k w_ak S_ak = anchors[a] . (w @ candidates)[a].
            weighted = (weights @ problem.candidate_rows * problem.anchors[rows]).sum(dim=1)
            eqs[rows] = torch.where(row_sum > 0, weighted / row_sum.clamp_min(
                torch.finfo(row_sum.dtype).tiny), torch.zeros_like(row_sum))
    return (lse_neg, eqs) if need_eqs else lse_neg


def backward_grads(problem: Problem, lse_neg: torch.Tensor, g: torch.Tensor, needs: Needs,
                   chunk: int) -> Grads:
    anchors, candidates, inv_temp = problem.anchors, problem.candidate_rows, problem.inv_temp
    d_anchors = torch.zeros_like(anchors) if needs.d_anchors else None
    d_candidates = torch.zeros_like(candidates) if needs.d_candidates else None
    need_d_inv_temp = needs.d_inv_temp and problem.logit_map is LogitMap.SCALED
    d_inv_temp = torch.zeros_like(inv_temp) if need_d_inv_temp else None
    for r0 in range(0, problem.M, chunk):
        rows = slice(r0, min(problem.M, r0 + chunk))
        a = anchors[rows]
        logits, S = _logits(problem, rows)
        _exclude_problem(logits, rows, problem)
        # dL_dl = g_a * Q_ak, built in the logits' storage.
        dL_dl = logits.sub_(lse_neg[rows, None]).exp_().mul_(g[rows, None])
        if problem.logit_map is LogitMap.ARTANH:
            # dl_dS = artanh_scale / (1 - S^2) inside the clamp, 0 outside. Self and exact
            # duplicates have S = +-1: keep the factor finite there (clamp_min) so that their
            # zero dL_dl does not turn into 0 * inf = NaN.
            eps = problem.artanh_eps
            inside = S.abs() < 1 - eps
            dl_dS = (1 - S * S).clamp_min_(eps).reciprocal_().mul_(problem.artanh_scale)
            dL_dS = dL_dl.mul_(dl_dS.mul_(inside))
            if d_anchors is not None:
                d_anchors[rows] = dL_dS @ candidates
            if d_candidates is not None:
                d_candidates.addmm_(dL_dS.T, a)
            continue
        inv_temp_rows = inv_temp[rows, None]
        if d_anchors is not None or d_inv_temp is not None:
            dL_dl_candidates = dL_dl @ candidates
            if d_anchors is not None:
                d_anchors[rows] = dL_dl_candidates * inv_temp_rows
            if d_inv_temp is not None:
                d_inv_temp[rows] = (dL_dl_candidates * a).sum(dim=1)
        if d_candidates is not None:
            d_candidates.addmm_(dL_dl.T, a * inv_temp_rows)
    return Grads(d_anchors, d_candidates, d_inv_temp)


# Both directions (layout cross_sym on one process): each chunk x K block of S serves its rows
# (row statistics, complete per chunk) and every column (a partial max / sum per chunk, merged
# online in chunk order: deterministic). Backward forms both directions' dL_dS from the one block.
# Extra memory: the columns' running max and sum (2 K) and about three chunk x K blocks.

def _both_logits(problem: Problem, S: torch.Tensor, rows: slice):
    """The rows' and the columns' logits of the block ``S = anchors[rows] @ candidates^T``,
    each with its exclusions as -inf (the columns' positives / selves index the anchors)."""
    M = problem.M
    if problem.logit_map is LogitMap.SCALED:
        row_logits = S * problem.inv_temp[rows, None]
        col_logits = S * problem.inv_temp[None, M:]
    else:
        eps = problem.artanh_eps
        row_logits = torch.atanh(S.clamp(-1 + eps, 1 - eps)).mul_(problem.artanh_scale)
        col_logits = row_logits.clone()
    _exclude(row_logits, rows, problem.pos_index, problem.self_index)
    r0 = rows.start
    for index in (problem.pos_index, problem.self_index):
        if index is None:
            continue
        col_index = index[M:] - r0  # the row of this block each column excludes, if any
        inside = (col_index >= 0) & (col_index < S.shape[0])
        cols = torch.nonzero(inside).squeeze(1)
        col_logits[col_index[cols], cols] = float("-inf")
    return row_logits, col_logits


def _zero_if_neg_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == float("-inf"), torch.zeros_like(x), x)


def forward_lse_both(problem: Problem, chunk: int) -> torch.Tensor:
    M, K = problem.M, problem.K
    anchors, candidates = problem.anchors, problem.candidates
    lse_neg = anchors.new_empty(M + K)
    col_max = anchors.new_full((K,), float("-inf"))
    col_sum = anchors.new_zeros(K)
    for r0 in range(0, M, chunk):
        rows = slice(r0, min(M, r0 + chunk))
        S = anchors[rows] @ candidates.T
        row_logits, col_logits = _both_logits(problem, S, rows)
        row_max = _zero_if_neg_inf(row_logits.amax(dim=1))
        lse_neg[rows] = row_max + row_logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_()
        new_max = torch.maximum(col_max, col_logits.amax(dim=0))
        shift = _zero_if_neg_inf(new_max)
        col_sum = (col_sum * torch.exp(col_max - shift)
                   + col_logits.sub_(shift[None, :]).exp_().sum(dim=0))
        col_max = new_max
    lse_neg[M:] = _zero_if_neg_inf(col_max) + col_sum.log()
    return lse_neg


def backward_grads_both(problem: Problem, lse_neg: torch.Tensor, g: torch.Tensor, needs: Needs,
                        chunk: int) -> Grads:
    M = problem.M
    anchors, candidates, inv_temp = problem.anchors, problem.candidates, problem.inv_temp
    d_anchors = torch.zeros_like(anchors) if needs.d_anchors else None
    d_candidates = torch.zeros_like(candidates) if needs.d_candidates else None
    scaled = problem.logit_map is LogitMap.SCALED
    need_d_inv_temp = needs.d_inv_temp and scaled
    d_inv_temp = torch.zeros_like(inv_temp) if need_d_inv_temp else None
    lse_cols, g_cols = lse_neg[None, M:], g[None, M:]
    for r0 in range(0, M, chunk):
        rows = slice(r0, min(M, r0 + chunk))
        a = anchors[rows]
        S = a @ candidates.T
        row_logits, col_logits = _both_logits(problem, S, rows)
        # dL_dl of each direction, in its logits' storage.
        dL_dl_rows = row_logits.sub_(lse_neg[rows, None]).exp_().mul_(g[rows, None])
        dL_dl_cols = col_logits.sub_(lse_cols).exp_().mul_(g_cols)
        if need_d_inv_temp:
            d_inv_temp[rows] = (dL_dl_rows * S).sum(dim=1)
            d_inv_temp[M:] += (dL_dl_cols * S).sum(dim=0)
        if scaled:
            dL_dS = dL_dl_rows.mul_(inv_temp[rows, None]).add_(
                dL_dl_cols.mul_(inv_temp[None, M:]))
        else:
            eps = problem.artanh_eps
            inside = S.abs() < 1 - eps
            dl_dS = (1 - S * S).clamp_min_(eps).reciprocal_().mul_(problem.artanh_scale)
            dL_dS = dL_dl_rows.add_(dL_dl_cols).mul_(dl_dS.mul_(inside))
        if d_anchors is not None:
            d_anchors[rows] = dL_dS @ candidates
        if d_candidates is not None:
            d_candidates.addmm_(dL_dS.T, a)
    return Grads(d_anchors, d_candidates, d_inv_temp)


class TorchBackend(Backend):
    """Runs anywhere PyTorch does, in the anchors' dtype; ignores ``operand_dtype``."""

    name = "torch"
    # Wherever torch runs, in any dtype its matmul supports, every width and option.
    capabilities = Capabilities(devices=(), dtypes=())

    def fwd(self, problem, need_grad):
        chunk = default_chunk(problem.M, problem.K)
        if problem.row_reduction is RowReduction.SOFTPLUS:
            return forward_softplus(problem, chunk), None
        if problem.both_directions:
            return forward_lse_both(problem, chunk), None
        return forward_lse(problem, chunk), None

    def fwd_eqs(self, problem, need_grad):
        lse_neg, eqs = forward_lse(problem, default_chunk(problem.M, problem.K), need_eqs=True)
        return lse_neg, None, eqs

    def bwd(self, problem, lse_neg, aux, g, needs):
        chunk = default_chunk(problem.M, problem.K)
        if problem.row_reduction is RowReduction.SOFTPLUS:
            return backward_softplus(problem, g, needs, chunk)
        if problem.both_directions:
            return backward_grads_both(problem, lse_neg, g, needs, chunk)
        return backward_grads(problem, lse_neg, g, needs, chunk)


BACKEND = TorchBackend()
