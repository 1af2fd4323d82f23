"""The primitive as PyTorch custom operators, so that ``torch.compile(fullgraph=True)`` sees every
backend as one opaque, shape-known op with a registered backward (no graph break), and
``torch.library.opcheck`` can check it.

Two ops, shared by every kernel backend (the backend is a string argument):

    macl_kernels::negative_lse(backend, anchors, candidates?, inv_temp?, pos_index, self_index?,
                               artanh_scale?, artanh_eps, operand_dtype?, need_grad)
        -> (lse_neg [M], aux)
    macl_kernels::negative_lse_backward(..., lse_neg, aux, grad_lse_neg, needs...)
        -> (d anchors, d candidates, d inv_temp)

``candidates=None`` means "the candidates are the anchors" (layout ``2n`` on one process, where
``S`` is symmetric and a backend may compute each off-diagonal tile once): the same tensor is then
passed once, never twice, which custom ops and Dynamo both require. ``aux`` is whatever a backend
keeps from forward for backward besides ``lse_neg`` (the Triton kernels' anchor-side accumulator
``E``); an empty tensor for the others.

A backend module takes part by defining

    fwd(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps, *,
        operand_dtype, need_grad) -> (lse_neg, aux or None)
    bwd(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux, grad_lse_neg,
        artanh_scale, artanh_eps, *, operand_dtype, need_anchors, need_candidates, need_inv_temp)
        -> (d anchors, d candidates, d inv_temp)   (None where not needed; with candidates=None,
                                                    d anchors is the whole gradient of the one
                                                    tensor and d candidates is None)
    fake_aux(anchors, candidates, need_grad) -> aux shape/dtype on the meta device (optional)

Gradients unused by autograd come back from the op as empty tensors (ops return tensors only).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import primitive


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


@torch.library.custom_op("macl_kernels::negative_lse", mutates_args=())
def negative_lse_op(backend: str, anchors: Tensor, candidates: Optional[Tensor],
                    inv_temp: Optional[Tensor], pos_index: Tensor, self_index: Optional[Tensor],
                    artanh_scale: Optional[float], artanh_eps: float,
                    operand_dtype: Optional[torch.dtype], need_grad: bool) -> Tuple[Tensor, Tensor]:
    lse_neg, aux = primitive(backend).fwd(
        anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps,
        operand_dtype=operand_dtype, need_grad=need_grad)
    return lse_neg, (aux if aux is not None else _empty(lse_neg))


@negative_lse_op.register_fake
def _(backend, anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps,
      operand_dtype, need_grad):
    lse_neg = anchors.new_empty((anchors.shape[0],))
    fake_aux = getattr(primitive(backend), "fake_aux", None)
    aux = fake_aux(anchors, candidates, need_grad) if fake_aux is not None else None
    return lse_neg, (aux if aux is not None else _empty(lse_neg))


@torch.library.custom_op("macl_kernels::negative_lse_backward", mutates_args=())
def negative_lse_backward_op(backend: str, anchors: Tensor, candidates: Optional[Tensor],
                             inv_temp: Optional[Tensor], pos_index: Tensor,
                             self_index: Optional[Tensor], lse_neg: Tensor, aux: Tensor,
                             grad_lse_neg: Tensor, artanh_scale: Optional[float],
                             artanh_eps: float, operand_dtype: Optional[torch.dtype],
                             need_anchors: bool, need_candidates: bool,
                             need_inv_temp: bool) -> Tuple[Tensor, Tensor, Tensor]:
    grads = primitive(backend).bwd(
        anchors, candidates, inv_temp, pos_index, self_index, lse_neg,
        aux if aux.numel() else None, grad_lse_neg.contiguous(), artanh_scale, artanh_eps,
        operand_dtype=operand_dtype, need_anchors=need_anchors, need_candidates=need_candidates,
        need_inv_temp=need_inv_temp)
    # Fresh tensors only: a custom op may not return (a view of) one of its inputs.
    return tuple(g.clone() if g is not None and g._base is not None else
                 (g if g is not None else _empty(anchors)) for g in grads)


@negative_lse_backward_op.register_fake
def _(backend, anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux, grad_lse_neg,
      artanh_scale, artanh_eps, operand_dtype, need_anchors, need_candidates, need_inv_temp):
    symmetric = candidates is None
    d_anchors = torch.empty_like(anchors) if (need_anchors or symmetric) else _empty(anchors)
    d_cand = (torch.empty_like(candidates) if (need_candidates and not symmetric)
              else _empty(anchors))
    d_inv = torch.empty_like(inv_temp) if (need_inv_temp and inv_temp is not None) else \
        _empty(anchors)
    return d_anchors, d_cand, d_inv


def _setup_context(ctx, inputs, output):
    (backend, anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps,
     operand_dtype, need_grad) = inputs
    lse_neg, aux = output
    ctx.mark_non_differentiable(aux)
    ctx.save_for_backward(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux)
    ctx.backend, ctx.artanh_scale, ctx.artanh_eps = backend, artanh_scale, artanh_eps
    ctx.operand_dtype = operand_dtype


def _backward(ctx, grad_lse_neg, grad_aux):
    anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux = ctx.saved_tensors
    need_anchors, need_candidates, need_inv_temp = ctx.needs_input_grad[1:4]
    d_anchors, d_cand, d_inv = negative_lse_backward_op(
        ctx.backend, anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux,
        grad_lse_neg, ctx.artanh_scale, ctx.artanh_eps, ctx.operand_dtype,
        need_anchors, need_candidates, need_inv_temp and inv_temp is not None)
    return (None, d_anchors if need_anchors else None, d_cand if need_candidates else None,
            d_inv if need_inv_temp else None, None, None, None, None, None, None)


negative_lse_op.register_autograd(_backward, setup_context=_setup_context)


def negative_lse(backend: str, anchors: Tensor, candidates: Optional[Tensor],
                 inv_temp: Optional[Tensor], pos_index: Tensor, self_index: Optional[Tensor],
                 artanh_scale: Optional[float], artanh_eps: float,
                 operand_dtype: Optional[torch.dtype]) -> Tensor:
    """``lse_neg`` of every anchor row by ``backend``'s kernels, through the custom op.
    ``candidates=None``: the candidates are the anchors (symmetric ``S``)."""
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (anchors, candidates, inv_temp))
    lse_neg, _ = negative_lse_op(
        backend, anchors.contiguous(), None if candidates is None else candidates.contiguous(),
        None if inv_temp is None else inv_temp.contiguous(), pos_index.contiguous(),
        None if self_index is None else self_index.contiguous(),
        None if artanh_scale is None else float(artanh_scale), float(artanh_eps),
        operand_dtype, need_grad)
    return lse_neg
