"""Backend ``"cpu"``: the fused C++ kernels of ``csrc/cpu/macl_cpu.cpp`` (extension
``macl_kernels._C_cpu``, built by ``setup.py``).

The same primitive as ``torch_chunked.py`` (per-row ``lse_neg``; recompute-in-backward), tiled
in C++ with the ``2n`` layout's symmetry exploited: when the anchors are the candidates and row
``a``'s self is candidate ``a``, only the tiles on and above the diagonal are computed, for both
their rows and their columns. float32 and float64; half inputs reach it upcast to float32 by the
functional layer.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

_EXTENSION = "macl_kernels._C_cpu"
_module = None
_import_error: Optional[str] = None


def _extension():
    """The compiled module, imported once; ``None`` (with ``_import_error`` set) if missing."""
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            _module = importlib.import_module(_EXTENSION)
        except ImportError as exc:  # not built, or built against another torch
            _import_error = f"{type(exc).__name__}: {exc}"
    return _module


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    if device is not None and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors only (got {device})"
    if _extension() is None:
        return (
            f"the C++ extension {_EXTENSION} could not be imported ({_import_error}); build it "
            f"with `pip install --no-build-isolation -e .` (or `make install`) in the source tree"
        )
    return None


def _is_symmetric(anchors, candidates) -> bool:
    """Layout 2n on one process: the functional layer passes one tensor as both anchors and
    candidates, so ``S`` is symmetric. (Exclusions need no symmetry: the kernel masks each side
    of a tile with its own anchor's positive and self.)"""
    return anchors is candidates


class FusedNegativeLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, inv_temp, pos_index, self_index, artanh_scale,
                artanh_eps, symmetric):
        ext = _extension()
        scale = -1.0 if artanh_scale is None else float(artanh_scale)
        lse_neg = ext.forward(anchors, candidates, inv_temp, pos_index, self_index, scale,
                              float(artanh_eps), symmetric)
        ctx.save_for_backward(anchors, candidates, inv_temp, pos_index, self_index, lse_neg)
        ctx.scale, ctx.eps, ctx.symmetric = scale, float(artanh_eps), symmetric
        return lse_neg

    @staticmethod
    def backward(ctx, grad_lse_neg):
        anchors, candidates, inv_temp, pos_index, self_index, lse_neg = ctx.saved_tensors
        need_a, need_c, need_b = ctx.needs_input_grad[:3]
        grad_a, grad_c, grad_b = _extension().backward(
            anchors, candidates, inv_temp, pos_index, self_index, lse_neg,
            grad_lse_neg.contiguous(), ctx.scale, ctx.eps, ctx.symmetric, need_a, need_c,
            need_b,
        )
        if ctx.symmetric:
            # anchors is candidates: the kernel returns the whole gradient of that one tensor.
            grad_c = None
        return (grad_a if (need_a or ctx.symmetric) else None,
                grad_c if need_c else None, grad_b if need_b else None,
                None, None, None, None, None)


def fwd(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps, *,
        operand_dtype=None, need_grad=True):
    """The custom-op protocol of ``macl_kernels/_ops.py``: ``candidates=None`` is layout 2n on
    one process, where the kernel computes each off-diagonal tile once for rows and columns."""
    _check_dtype(anchors)
    symmetric = candidates is None
    scale = -1.0 if artanh_scale is None else float(artanh_scale)
    lse_neg = _extension().forward(anchors, anchors if symmetric else candidates,
                                   _cast(inv_temp, anchors), pos_index, self_index, scale,
                                   float(artanh_eps), symmetric)
    return lse_neg, None


def bwd(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux, grad_lse_neg,
        artanh_scale, artanh_eps, *, operand_dtype=None, need_anchors=True,
        need_candidates=True, need_inv_temp=True):
    symmetric = candidates is None
    scale = -1.0 if artanh_scale is None else float(artanh_scale)
    d_anchors, d_candidates, d_inv_temp = _extension().backward(
        anchors, anchors if symmetric else candidates, _cast(inv_temp, anchors), pos_index,
        self_index, lse_neg, grad_lse_neg.to(anchors.dtype).contiguous(), scale,
        float(artanh_eps), symmetric, need_anchors, need_candidates, need_inv_temp)
    return d_anchors, (None if symmetric else d_candidates), d_inv_temp


def _check_dtype(anchors):
    if anchors.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the cpu backend computes in float32 or float64, got {anchors.dtype}")


def _cast(inv_temp, like):
    return None if inv_temp is None else inv_temp.to(like.dtype).contiguous()


def negative_lse(anchors: torch.Tensor, candidates: torch.Tensor, inv_temp: Optional[torch.Tensor],
                 pos_index: torch.Tensor, self_index: Optional[torch.Tensor],
                 artanh_scale: Optional[float], artanh_eps: float, *,
                 operand_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The primitive's entry point (see torch_chunked.negative_lse). Computes in the dtype of
    ``anchors`` (float32 or float64); ``operand_dtype`` is not used on the CPU."""
    if anchors.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the cpu backend computes in float32 or float64, got {anchors.dtype}")
    symmetric = _is_symmetric(anchors, candidates)
    anchors_c = anchors.contiguous()
    candidates_c = anchors_c if symmetric else candidates.contiguous()
    if inv_temp is not None:
        inv_temp = inv_temp.to(anchors.dtype).contiguous()
    return FusedNegativeLSE.apply(anchors_c, candidates_c, inv_temp, pos_index.contiguous(),
                                  None if self_index is None else self_index.contiguous(),
                                  artanh_scale, artanh_eps, symmetric)
