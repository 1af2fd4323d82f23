"""Backend ``"torch"``: the shared primitive in pure PyTorch, chunked over anchor rows.

The primitive (the one every loss is built from, see ``macl_kernels/functional.py``) is, per
anchor row ``a``,

    lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak),   l_ak = b_a * S_ak   or   c * artanh(S_ak)

with ``S = anchors @ candidates^T``. Forward walks ``chunk`` anchor rows at a time, keeps only
``lse_neg`` (``M`` floats), and frees each ``chunk x K`` tile. Backward recomputes the tile and
forms, for an upstream gradient ``g``,

    G_ak = dL/dl_ak = g_a * Q_ak,   Q_ak = exp(l_ak - lse_neg[a])   (0 off Neg(a))

Scaled map: ``l = diag(b) S``, so the row scale rides on the ``chunk x D`` operands instead of
costing a pass over the ``chunk x K`` tile:

    logits        = (b * anchors) @ candidates^T
    d anchors     = b * (G @ candidates)
    d candidates += G^T @ (b * anchors)
    d b_a         = sum_k G_ak S_ak = anchors[a] . (G @ candidates)[a]

artanh map: ``dL/dS = G * c / (1 - S^2)`` (0 where clamped), then the same two GEMMs.

Extra memory: O((M + K) * D + chunk * K), never O(M * K). Works on any device and dtype the
matmul supports; callers pass float32 or float64 (half inputs are upcast by the caller).
"""

from __future__ import annotations

from typing import Optional

import torch

# Elements per chunk x K tile: 2M fp32 elements = 8 MiB per live tile. Measured on the 2-core
# x86 CI machine, MACL 2n, 2N = 8192, D = 128, forward+backward: 2**20 / 2**21 / 2**23 took
# about 1.0 / 0.9 / 1.15 s with 50-77 / 61-72 / 97-115 MB peak RSS growth; larger tiles only
# cost memory (allocator caching grows with the tile), much smaller ones pay per-chunk overhead.
TILE_ELEMENTS = 1 << 21


def default_chunk(num_rows: int, num_candidates: int) -> int:
    return max(1, min(num_rows, TILE_ELEMENTS // max(1, num_candidates)))


def _exclude(logits, rows, pos_index, self_index):
    """Drop the positive and self from the candidate set (Neg(a)), by index, not by a big constant."""
    logits.scatter_(1, pos_index[rows, None], float("-inf"))
    if self_index is not None:
        logits.scatter_(1, self_index[rows, None], float("-inf"))
    return logits


def _logits(anchors, candidates, inv_temp_rows, artanh_scale, artanh_eps):
    """The logits tile, and ``S`` when the artanh map needs it again in backward."""
    if artanh_scale is None:
        return (anchors * inv_temp_rows[:, None]) @ candidates.T, None
    S = anchors @ candidates.T
    return torch.atanh(S.clamp(-1 + artanh_eps, 1 - artanh_eps)).mul_(artanh_scale), S


def forward_lse(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps,
                chunk):
    M = anchors.shape[0]
    lse_neg = anchors.new_empty(M)
    for r0 in range(0, M, chunk):
        rows = slice(r0, min(M, r0 + chunk))
        logits, _ = _logits(anchors[rows], candidates,
                            inv_temp[rows] if inv_temp is not None else None,
                            artanh_scale, artanh_eps)
        _exclude(logits, rows, pos_index, self_index)
        # In-place log-sum-exp: the tile is dead after this, so reuse its storage.
        row_max = logits.amax(dim=1)
        lse_neg[rows] = row_max + logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_()
    return lse_neg


def backward_grads(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, grad_lse_neg,
                   artanh_scale, artanh_eps, chunk, need_anchors, need_candidates, need_inv_temp):
    M = anchors.shape[0]
    grad_anchors = torch.zeros_like(anchors) if need_anchors else None
    grad_candidates = torch.zeros_like(candidates) if need_candidates else None
    grad_inv_temp = torch.zeros_like(inv_temp) if need_inv_temp else None
    for r0 in range(0, M, chunk):
        rows = slice(r0, min(M, r0 + chunk))
        a = anchors[rows]
        b = inv_temp[rows, None] if inv_temp is not None else None
        logits, S = _logits(a, candidates, inv_temp[rows] if b is not None else None,
                            artanh_scale, artanh_eps)
        _exclude(logits, rows, pos_index, self_index)
        # G = dL/dl = g_a * Q_ak, built in the logits' storage.
        G = logits.sub_(lse_neg[rows, None]).exp_().mul_(grad_lse_neg[rows, None])
        if artanh_scale is not None:
            # d artanh(clamp(S))/dS = 1/(1 - S^2) inside the clamp, 0 outside. Self and
            # exact duplicates have S = +-1: keep the factor finite there (clamp_min) so that
            # their zero dL/dl does not turn into 0 * inf = NaN.
            inside = S.abs() < 1 - artanh_eps
            factor = (1 - S * S).clamp_min_(artanh_eps).reciprocal_().mul_(artanh_scale)
            grad_S = G.mul_(factor.mul_(inside))
            if need_anchors:
                grad_anchors[rows] = grad_S @ candidates
            if need_candidates:
                grad_candidates.addmm_(grad_S.T, a)
            continue
        if need_anchors or need_inv_temp:
            G_candidates = G @ candidates
            if need_anchors:
                grad_anchors[rows] = G_candidates * b
            if need_inv_temp:
                grad_inv_temp[rows] = (G_candidates * a).sum(dim=1)
        if need_candidates:
            grad_candidates.addmm_(G.T, a * b)
    return grad_anchors, grad_candidates, grad_inv_temp


class ChunkedNegativeLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, inv_temp, pos_index, self_index, artanh_scale,
                artanh_eps, chunk):
        lse_neg = forward_lse(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale,
                              artanh_eps, chunk)
        ctx.save_for_backward(anchors, candidates, inv_temp, pos_index, self_index, lse_neg)
        ctx.artanh_scale, ctx.artanh_eps, ctx.chunk = artanh_scale, artanh_eps, chunk
        return lse_neg

    @staticmethod
    def backward(ctx, grad_lse_neg):
        anchors, candidates, inv_temp, pos_index, self_index, lse_neg = ctx.saved_tensors
        grads = backward_grads(anchors, candidates, inv_temp, pos_index, self_index, lse_neg,
                               grad_lse_neg, ctx.artanh_scale, ctx.artanh_eps, ctx.chunk,
                               *ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None)


def fwd(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps, *,
        operand_dtype=None, need_grad=True):
    """The custom-op protocol of ``macl_kernels/_ops.py`` (``candidates=None``: the anchors)."""
    candidates = anchors if candidates is None else candidates
    chunk = default_chunk(anchors.shape[0], candidates.shape[0])
    return forward_lse(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale,
                       artanh_eps, chunk), None


def bwd(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux, grad_lse_neg,
        artanh_scale, artanh_eps, *, operand_dtype=None, need_anchors=True,
        need_candidates=True, need_inv_temp=True):
    symmetric = candidates is None
    candidates = anchors if symmetric else candidates
    chunk = default_chunk(anchors.shape[0], candidates.shape[0])
    d_anchors, d_candidates, d_inv_temp = backward_grads(
        anchors, candidates, inv_temp, pos_index, self_index, lse_neg, grad_lse_neg,
        artanh_scale, artanh_eps, chunk, need_anchors or symmetric,
        need_candidates or symmetric, need_inv_temp)
    if symmetric:  # one tensor in both roles: its gradient is the sum of both
        return d_anchors.add_(d_candidates), None, d_inv_temp
    return d_anchors, d_candidates, d_inv_temp


def negative_lse(anchors: torch.Tensor, candidates: torch.Tensor, inv_temp: Optional[torch.Tensor],
                 pos_index: torch.Tensor, self_index: Optional[torch.Tensor],
                 artanh_scale: Optional[float], artanh_eps: float, *,
                 operand_dtype: Optional[torch.dtype] = None,
                 chunk: Optional[int] = None) -> torch.Tensor:
    """The primitive's entry point, the same signature in every backend. This backend computes
    in the dtype of ``anchors`` (float32 or float64) and ignores ``operand_dtype``."""
    chunk = chunk or default_chunk(anchors.shape[0], candidates.shape[0])
    return ChunkedNegativeLSE.apply(anchors, candidates, inv_temp, pos_index, self_index,
                                    artanh_scale, artanh_eps, chunk)
