"""The primitive (``docs/math.md#the-primitive``) as two PyTorch custom operators, shared by
every kernel backend (the backend is a string argument):

    macl_kernels::negative_lse(backend, anchors, candidates?, inv_temp?, pos_index, self_index?,
                               logit_map, artanh_scale, artanh_eps, operand_dtype?, need_grad,
                               row_reduction=0, row_bias?=None, anchor_labels?=None,
                               candidate_labels?=None, need_eqs=False, both_directions=False)
        -> (lse_neg [M] (both_directions: [M + K]), aux, eqs [M] or empty)
    macl_kernels::negative_lse_backward(..., lse_neg, aux, g, need_d_anchors,
                                        need_d_candidates, need_d_inv_temp, row_reduction=0,
                                        row_bias?=None, need_d_row_bias=False,
                                        anchor_labels?=None, candidate_labels?=None,
                                        both_directions=False)
        -> (d_anchors, d_candidates, d_inv_temp, d_row_bias)

``row_reduction`` (``RowReduction``): ``LSE`` (the default) returns ``lse_neg``; ``SOFTPLUS``
(SigLIP) returns ``sp_neg[a] = sum_{k in Neg(a)} softplus(inv_temp[a] S_ak + row_bias[a])`` in
the same slot, differentiable in ``row_bias`` too.

``anchor_labels`` / ``candidate_labels`` (int64 ``[M]`` / ``[K]``) add the label mask to
``Neg(a)``; ``need_eqs`` asks for the statistic ``eqs[a] = sum_k Q_ak S_ak`` (no gradient flows
through it: it is ``d lse_neg[a] / d inv_temp[a]``, a statistic for SogCLR / iSogCLR).

so that ``torch.compile(fullgraph=True)`` sees one opaque, shape-known op with a registered
backward, and ``torch.library.opcheck`` can check it. Inside, the arguments become one
``Problem`` (``protocol.py``) handed to the backend's ``fwd`` / ``bwd`` / ``fake_aux``.

``candidates=None`` means the candidates are the anchors (layout ``2n`` on one process): the
tensor is passed once, as custom ops and Dynamo require, and ``S`` is symmetric. The gradient of
that one tensor is ``d_anchors + d_candidates``; that fold is made here and nowhere else.
``aux`` is what a backend keeps from forward for backward besides ``lse_neg`` (Triton's
anchor-side accumulator ``E``), an empty tensor otherwise. Gradients autograd does not need come
back from the op as empty tensors (ops return tensors only).

``negative_lse(...)`` at the bottom is the one entry point of the losses and the tests.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .protocol import LogitMap, Needs, Problem, RowReduction, autocast_off
from .backends import kernel_backend


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _problem(anchors, candidates, inv_temp, pos_index, self_index, logit_map, artanh_scale,
             artanh_eps, operand_dtype, row_reduction=0, row_bias=None, anchor_labels=None,
             candidate_labels=None, both_directions=False) -> Problem:
    return Problem(anchors, candidates, inv_temp, pos_index, self_index, LogitMap(logit_map),
                   artanh_scale, artanh_eps, operand_dtype, RowReduction(row_reduction), row_bias,
                   anchor_labels, None if candidates is None else candidate_labels,
                   both_directions)


@torch.library.custom_op("macl_kernels::negative_lse", mutates_args=())
def negative_lse_op(backend: str, anchors: Tensor, candidates: Optional[Tensor],
                    inv_temp: Optional[Tensor], pos_index: Tensor, self_index: Optional[Tensor],
                    logit_map: int, artanh_scale: float, artanh_eps: float,
                    operand_dtype: Optional[torch.dtype], need_grad: bool, row_reduction: int = 0,
                    row_bias: Optional[Tensor] = None, anchor_labels: Optional[Tensor] = None,
                    candidate_labels: Optional[Tensor] = None, need_eqs: bool = False,
                    both_directions: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    problem = _problem(anchors, candidates, inv_temp, pos_index, self_index, logit_map,
                       artanh_scale, artanh_eps, operand_dtype, row_reduction, row_bias,
                       anchor_labels, candidate_labels, both_directions)
    impl = kernel_backend(backend)
    # The backend's capabilities (dtype, width, both_directions, ...): a clear error, not a
    # kernel's crash.
    impl.check(problem)
    if need_eqs:
        if problem.logit_map is not LogitMap.SCALED:
            raise ValueError("need_eqs (eqs = d lse_neg / d inv_temp) needs LogitMap.SCALED")
        lse_neg, aux, eqs = impl.fwd_eqs(problem, need_grad)
    else:
        (lse_neg, aux), eqs = impl.fwd(problem, need_grad), None
    return (lse_neg, (aux if aux is not None else _empty(lse_neg)),
            eqs if eqs is not None else _empty(lse_neg))


@negative_lse_op.register_fake
def _(backend, anchors, candidates, inv_temp, pos_index, self_index, logit_map, artanh_scale,
      artanh_eps, operand_dtype, need_grad, row_reduction=0, row_bias=None, anchor_labels=None,
      candidate_labels=None, need_eqs=False, both_directions=False):
    problem = _problem(anchors, candidates, inv_temp, pos_index, self_index, logit_map,
                       artanh_scale, artanh_eps, operand_dtype, row_reduction, row_bias,
                       anchor_labels, candidate_labels, both_directions)
    lse_neg = anchors.new_empty((problem.num_lse,))
    aux = kernel_backend(backend).fake_aux(problem, need_grad)
    eqs = anchors.new_empty((anchors.shape[0],)) if need_eqs else _empty(lse_neg)
    return lse_neg, (aux if aux is not None else _empty(lse_neg)), eqs


@torch.library.custom_op("macl_kernels::negative_lse_backward", mutates_args=())
def negative_lse_backward_op(backend: str, anchors: Tensor, candidates: Optional[Tensor],
                             inv_temp: Optional[Tensor], pos_index: Tensor,
                             self_index: Optional[Tensor], logit_map: int, artanh_scale: float,
                             artanh_eps: float, operand_dtype: Optional[torch.dtype],
                             lse_neg: Tensor, aux: Tensor, g: Tensor, need_d_anchors: bool,
                             need_d_candidates: bool,
                             need_d_inv_temp: bool, row_reduction: int = 0,
                             row_bias: Optional[Tensor] = None,
                             need_d_row_bias: bool = False,
                             anchor_labels: Optional[Tensor] = None,
                             candidate_labels: Optional[Tensor] = None,
                             both_directions: bool = False
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    problem = _problem(anchors, candidates, inv_temp, pos_index, self_index, logit_map,
                       artanh_scale, artanh_eps, operand_dtype, row_reduction, row_bias,
                       anchor_labels, candidate_labels, both_directions)
    need_d_inv_temp = need_d_inv_temp and inv_temp is not None
    need_d_row_bias = need_d_row_bias and row_bias is not None
    if problem.symmetric:  # one tensor in both roles: it needs both sides
        needs = Needs(need_d_anchors or need_d_candidates, need_d_anchors or need_d_candidates,
                      need_d_inv_temp, need_d_row_bias)
    else:
        needs = Needs(need_d_anchors, need_d_candidates, need_d_inv_temp, need_d_row_bias)
    # A row with an empty Neg(a) has lse_neg = -inf and no gradient: every l_ak it could reach is
    # -inf too, and Q_ak = exp(l_ak - lse_neg) must be exp(-inf) = 0, not exp(-inf + inf) = NaN.
    # Shifting by 0 instead of -inf there gives every backend that convention, once, here
    # (docs/math.md#numerical-hazards).
    lse_neg = torch.where(lse_neg == float("-inf"), torch.zeros_like(lse_neg), lse_neg)
    # The losses run their forward with autocast off (docs/math.md#numerical-hazards); autograd
    # runs this backward under whatever autocast region ``loss.backward()`` was called in, which
    # would round the backward's GEMMs (and mix dtypes): turn it off here too.
    with autocast_off(anchors.device.type):
        grads = kernel_backend(backend).bwd(problem, lse_neg, aux if aux.numel() else None,
                                            g.to(lse_neg.dtype).contiguous(), needs)
    d_anchors, d_candidates, d_inv_temp, d_row_bias = grads
    if problem.symmetric:
        # The fold: the gradient of the one tensor is the sum of both sides (a kernel that
        # exploits the symmetry inside has already summed them into d_anchors).
        if d_candidates is not None:
            d_anchors = d_candidates if d_anchors is None else d_anchors + d_candidates
        d_candidates = None
    if d_inv_temp is not None:
        d_inv_temp = d_inv_temp.to(inv_temp.dtype)
    if d_row_bias is not None:
        d_row_bias = d_row_bias.to(row_bias.dtype)
    # Fresh tensors only: a custom op may not return (a view of) one of its inputs.
    return tuple(t.clone() if t is not None and t._base is not None else
                 (t if t is not None else _empty(anchors))
                 for t in (d_anchors, d_candidates, d_inv_temp, d_row_bias))


@negative_lse_backward_op.register_fake
def _(backend, anchors, candidates, inv_temp, pos_index, self_index, logit_map, artanh_scale,
      artanh_eps, operand_dtype, lse_neg, aux, g, need_d_anchors, need_d_candidates,
      need_d_inv_temp, row_reduction=0, row_bias=None, need_d_row_bias=False,
      anchor_labels=None, candidate_labels=None, both_directions=False):
    symmetric = candidates is None
    one_tensor_grad = symmetric and (need_d_anchors or need_d_candidates)
    d_anchors = (torch.empty_like(anchors) if (need_d_anchors or one_tensor_grad)
                 else _empty(anchors))
    d_candidates = (torch.empty_like(candidates) if (need_d_candidates and not symmetric)
                    else _empty(anchors))
    d_inv_temp = (torch.empty_like(inv_temp) if (need_d_inv_temp and inv_temp is not None)
                  else _empty(anchors))
    d_row_bias = (torch.empty_like(row_bias) if (need_d_row_bias and row_bias is not None)
                  else _empty(anchors))
    return d_anchors, d_candidates, d_inv_temp, d_row_bias


def _setup_context(ctx, inputs, output):
    (backend, anchors, candidates, inv_temp, pos_index, self_index, logit_map, artanh_scale,
     artanh_eps, operand_dtype, need_grad, row_reduction, row_bias, anchor_labels,
     candidate_labels, need_eqs, both_directions) = inputs
    lse_neg, aux, eqs = output
    ctx.mark_non_differentiable(aux, eqs)
    # aux and eqs never receive a gradient: without this autograd would hand backward a zero
    # tensor of aux's size (SigLIP's aux is (M + K) D: 4 MiB at N = 4096, D = 128, fp32).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux,
                          row_bias, anchor_labels, candidate_labels)
    ctx.scalars = (logit_map, artanh_scale, artanh_eps, operand_dtype)
    ctx.row_reduction = row_reduction
    ctx.both_directions = both_directions
    ctx.backend = backend


def _backward(ctx, grad_lse_neg, grad_aux, grad_eqs):
    (anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux, row_bias,
     anchor_labels, candidate_labels) = ctx.saved_tensors
    need_d_anchors, need_d_candidates, need_d_inv_temp = ctx.needs_input_grad[1:4]
    needs_input_grad = tuple(ctx.needs_input_grad) + (False,) * 2
    need_d_row_bias = needs_input_grad[12] and row_bias is not None
    if grad_lse_neg is None:  # lse_neg unused by the loss (grads are not materialised)
        return (None,) * 17
    d_anchors, d_candidates, d_inv_temp, d_row_bias = negative_lse_backward_op(
        ctx.backend, anchors, candidates, inv_temp, pos_index, self_index, *ctx.scalars,
        lse_neg, aux, grad_lse_neg, need_d_anchors, need_d_candidates,
        need_d_inv_temp and inv_temp is not None, ctx.row_reduction, row_bias, need_d_row_bias,
        anchor_labels, candidate_labels, ctx.both_directions)
    # One entry per input of negative_lse: backend, anchors, candidates, inv_temp, 8 more
    # (pos_index ... need_grad, row_reduction), row_bias, 4 more (labels, need_eqs,
    # both_directions).
    return (None, d_anchors if need_d_anchors else None,
            d_candidates if need_d_candidates else None,
            d_inv_temp if need_d_inv_temp else None) + (None,) * 8 + (
                d_row_bias if need_d_row_bias else None,) + (None,) * 4


negative_lse_op.register_autograd(_backward, setup_context=_setup_context)


def negative_lse(backend: str, anchors: Tensor, candidates: Optional[Tensor],
                 inv_temp: Optional[Tensor], pos_index: Tensor, self_index: Optional[Tensor],
                 logit_map: LogitMap = LogitMap.SCALED, artanh_scale: float = 0.0,
                 artanh_eps: float = 0.0, operand_dtype: Optional[torch.dtype] = None,
                 row_reduction: RowReduction = RowReduction.LSE,
                 row_bias: Optional[Tensor] = None,
                 anchor_labels: Optional[Tensor] = None, candidate_labels: Optional[Tensor] = None,
                 return_eqs: bool = False, both_directions: bool = False):
    """``lse_neg`` of every anchor row by kernel backend ``backend`` (``"torch"``, ``"cpu"``,
    ``"triton"``, ``"cuda"``), differentiable in ``anchors``, ``candidates`` and ``inv_temp``.

    ``candidates=None``: the candidates are the anchors (symmetric ``S``). ``LogitMap.SCALED``
    needs ``inv_temp [M]``; ``LogitMap.ARTANH`` takes ``artanh_scale > 0`` and ``artanh_eps`` in
    ``(0, 1)`` and no ``inv_temp``. ``operand_dtype``: see ``Problem``.

    ``row_reduction=RowReduction.SOFTPLUS``: ``sum_{k in Neg(a)} softplus(inv_temp[a] S_ak +
    row_bias[a])`` instead (SCALED map, ``candidates`` given; ``row_bias [M]`` or ``None``),
    differentiable in ``row_bias`` as well.

    ``anchor_labels [M]`` with ``candidate_labels [K]`` (integer; ``candidate_labels`` omitted
    when ``candidates=None``) drop every same-label candidate from ``Neg(a)``.
    ``return_eqs``: return ``(lse_neg, eqs)``, ``eqs`` a detached statistic (SCALED only).

    ``both_directions``: the columns of ``S`` are anchors too (``inv_temp``, ``pos_index``,
    ``self_index`` and the result have ``M + K`` entries, rows first; see ``Problem``); the LSE
    reduction without labels or ``eqs`` only.
    """
    logit_map = LogitMap(logit_map)
    if both_directions:
        if candidates is None:
            raise ValueError("both_directions needs candidates (the columns' anchors)")
        if (RowReduction(row_reduction) is not RowReduction.LSE or anchor_labels is not None
                or candidate_labels is not None or return_eqs):
            raise ValueError("both_directions takes the LSE row reduction without labels or "
                             "return_eqs (run the two directions as two calls)")
        num_lse = anchors.shape[0] + candidates.shape[0]
        for name, t in (("inv_temp", inv_temp), ("pos_index", pos_index),
                        ("self_index", self_index)):
            if t is not None and tuple(t.shape) != (num_lse,):
                raise ValueError(f"{name} must have M + K = {num_lse} entries with "
                                 f"both_directions, got shape {tuple(t.shape)}")
    row_reduction = RowReduction(row_reduction)
    if row_reduction is RowReduction.SOFTPLUS:
        # SigLIP needs neither the artanh map nor a symmetric S; the kernels implement the
        # softplus reduction for the cross, SCALED case only.
        if logit_map is not LogitMap.SCALED:
            raise ValueError("RowReduction.SOFTPLUS takes LogitMap.SCALED only")
        if candidates is None:
            raise ValueError("RowReduction.SOFTPLUS needs distinct candidates (candidates=None, "
                             "a symmetric problem, is not supported)")
        if row_bias is not None and (row_bias.shape != (anchors.shape[0],)
                                     or row_bias.dtype != anchors.dtype):
            raise ValueError(f"row_bias must be a [M] = [{anchors.shape[0]}] tensor of the "
                             f"anchors' dtype {anchors.dtype}, got {tuple(row_bias.shape)} "
                             f"{row_bias.dtype}")
    elif row_bias is not None:
        raise ValueError("row_bias is an argument of RowReduction.SOFTPLUS only")
    if logit_map is LogitMap.SCALED and inv_temp is None:
        raise ValueError("inv_temp is required by LogitMap.SCALED (l = inv_temp[a] * S)")
    if logit_map is LogitMap.ARTANH:
        if inv_temp is not None:
            raise ValueError("LogitMap.ARTANH takes no inv_temp (l = artanh_scale * artanh(S))")
        if not artanh_scale > 0 or not 0 < artanh_eps < 1:
            raise ValueError(f"LogitMap.ARTANH needs artanh_scale > 0 and 0 < artanh_eps < 1, "
                             f"got {artanh_scale!r} and {artanh_eps!r}")
    if candidates is not None and (anchor_labels is None) != (candidate_labels is None):
        raise ValueError("anchor_labels and candidate_labels go together (candidate_labels "
                         "is omitted only when candidates=None)")
    if candidates is None and candidate_labels is not None:
        raise ValueError("candidate_labels must be None when candidates=None (the anchors' "
                         "labels serve)")
    if return_eqs and logit_map is not LogitMap.SCALED:
        raise ValueError("return_eqs (eqs = d lse_neg / d inv_temp) needs LogitMap.SCALED")
    labels = [None if t is None else t.to(torch.int64).contiguous()
              for t in (anchor_labels, candidate_labels)]
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (anchors, candidates, inv_temp, row_bias))
    lse_neg, _, eqs = negative_lse_op(
        backend, anchors.contiguous(), None if candidates is None else candidates.contiguous(),
        None if inv_temp is None else inv_temp.contiguous(), pos_index.contiguous(),
        None if self_index is None else self_index.contiguous(), int(logit_map),
        float(artanh_scale), float(artanh_eps), operand_dtype, need_grad, int(row_reduction),
        None if row_bias is None else row_bias.contiguous(), labels[0], labels[1],
        bool(return_eqs), bool(both_directions))
    return (lse_neg, eqs) if return_eqs else lse_neg
