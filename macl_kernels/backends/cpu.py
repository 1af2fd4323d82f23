"""Backend ``"cpu"``: the fused C++ kernels of ``csrc/cpu/macl_cpu.cpp`` (extension
``macl_kernels._C_cpu``, built by ``setup.py``).

The same primitive as ``torch_chunked.py`` (per-row ``lse_neg``; recompute-in-backward), tiled
in C++ with the ``2n`` layout's symmetry exploited: when the anchors are the candidates, only the
tiles on and above the diagonal are computed, for both their rows and their columns. float32 and float64; half inputs reach it upcast to float32 by the
functional layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from ._native import Extension, artanh_scale_arg, cast_rows

_EXTENSION = Extension("macl_kernels._C_cpu")


def _extension():
    return _EXTENSION.get()


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    if device is not None and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors only (got {device})"
    if _extension() is None:
        return (
            f"the C++ extension {_EXTENSION.name} could not be imported ({_EXTENSION.error}); "
            f"build it with `pip install --no-build-isolation -e .` (or `make install`) in the "
            f"source tree"
        )
    return None


def fwd(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps, *,
        operand_dtype=None, need_grad=True):
    """The custom-op protocol of ``macl_kernels/_ops.py``: ``candidates=None`` is layout 2n on
    one process, where the kernel computes each off-diagonal tile once for rows and columns."""
    _check_dtype(anchors)
    symmetric = candidates is None
    lse_neg = _extension().forward(anchors, anchors if symmetric else candidates,
                                   cast_rows(inv_temp, anchors), pos_index, self_index,
                                   artanh_scale_arg(artanh_scale), float(artanh_eps), symmetric)
    return lse_neg, None


def bwd(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux, grad_lse_neg,
        artanh_scale, artanh_eps, *, operand_dtype=None, need_anchors=True,
        need_candidates=True, need_inv_temp=True):
    symmetric = candidates is None
    d_anchors, d_candidates, d_inv_temp = _extension().backward(
        anchors, anchors if symmetric else candidates, cast_rows(inv_temp, anchors), pos_index,
        self_index, lse_neg, grad_lse_neg.to(anchors.dtype).contiguous(),
        artanh_scale_arg(artanh_scale), float(artanh_eps), symmetric, need_anchors, need_candidates, need_inv_temp)
    return d_anchors, (None if symmetric else d_candidates), d_inv_temp


def _check_dtype(anchors):
    if anchors.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the cpu backend computes in float32 or float64, got {anchors.dtype}")


def negative_lse(anchors: torch.Tensor, candidates: torch.Tensor, inv_temp: Optional[torch.Tensor],
                 pos_index: torch.Tensor, self_index: Optional[torch.Tensor],
                 artanh_scale: Optional[float], artanh_eps: float, *,
                 operand_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The primitive's entry point (see torch_chunked.negative_lse), through the custom op.
    Passing one tensor as both ``anchors`` and ``candidates`` selects the symmetric tiling."""
    _check_dtype(anchors)
    return _ops.negative_lse("cpu", anchors, None if candidates is anchors else candidates,
                             inv_temp, pos_index, self_index, artanh_scale, artanh_eps,
                             operand_dtype)
