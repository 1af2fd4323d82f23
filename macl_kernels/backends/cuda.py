"""Backend ``"cuda"``: the CUDA C++ kernels of ``csrc/cuda/macl_cuda.cu`` (extension
``macl_kernels._C_cuda``, built by ``setup.py`` when torch is a CUDA build).

The same primitive as ``torch_chunked.py`` (per-row ``lse_neg``; recompute-in-backward), as a
tiled forward kernel and one backward launch whose anchor blocks produce ``d anchors`` and
``d inv_temp`` and whose candidate blocks produce ``d candidates`` (no atomics: deterministic).

Precision: statistics and gradients are float32 for float32 / bfloat16 / float16 inputs. The
GEMM operands are the inputs' precision (``operand_dtype``): float32 runs on CUDA cores with fp32
FMA; bfloat16 / float16 are rounded back to that dtype and run on tensor cores (WMMA, fp32
accumulation), as the user's data already was. float64 inputs take a plain, untiled float64
path: exact but slow (use backend ``"torch"`` when float64 speed matters).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from ._native import Extension, artanh_scale_arg, cast_rows

_EXTENSION = Extension("macl_kernels._C_cuda")

# MaclOperand codes of csrc/cuda/macl_cuda.h.
_OPERAND_F32, _OPERAND_F16, _OPERAND_BF16, _OPERAND_F64 = 0, 1, 2, 3
_HALF_OPERANDS = {torch.float16: _OPERAND_F16, torch.bfloat16: _OPERAND_BF16}

_REBUILD = ("rebuild the extension against it: `pip install --no-build-isolation --no-deps -e .` "
            "in the source tree")


def _extension():
    return _EXTENSION.get()


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    if device is not None and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only (got {device})"
    if getattr(torch.version, "hip", None):
        return (f"this torch ({torch.__version__}) is a ROCm build; the cuda backend needs "
                f"NVIDIA CUDA (use backend='triton' or 'torch')")
    if not torch.version.cuda:
        return (f"this torch ({torch.__version__}) is a CPU build: install a CUDA build of "
                f"PyTorch, then {_REBUILD}")
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    if _extension() is None:
        return (f"the CUDA extension {_EXTENSION.name} was not built or could not be imported "
                f"({_EXTENSION.error}); with a CUDA build of torch (here: torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}) and nvcc installed, {_REBUILD}")
    return None


def _operand_code(compute_dtype: torch.dtype, operand_dtype: Optional[torch.dtype]) -> int:
    if compute_dtype == torch.float64:
        return _OPERAND_F64
    if compute_dtype != torch.float32:
        raise TypeError(f"the cuda backend computes in float32 or float64, got {compute_dtype}")
    return _HALF_OPERANDS.get(operand_dtype, _OPERAND_F32)


def fwd(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps, *,
        operand_dtype=None, need_grad=True):
    """The custom-op protocol of ``macl_kernels/_ops.py`` (``candidates=None``: layout 2n on one
    process, the anchors are the candidates). No auxiliary state: backward recomputes."""
    operand = _operand_code(anchors.dtype, operand_dtype)
    anchors = anchors.contiguous()
    cands = anchors if candidates is None else candidates.to(anchors.dtype).contiguous()
    scale = artanh_scale_arg(artanh_scale)
    lse_neg = _extension().forward(anchors, cands, cast_rows(inv_temp, anchors),
                                   pos_index.contiguous(),
                                   None if self_index is None else self_index.contiguous(),
                                   scale, float(artanh_eps), operand)
    return lse_neg, None


def bwd(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux, grad_lse_neg,
        artanh_scale, artanh_eps, *, operand_dtype=None, need_anchors=True,
        need_candidates=True, need_inv_temp=True):
    operand = _operand_code(anchors.dtype, operand_dtype)
    symmetric = candidates is None
    anchors = anchors.contiguous()
    cands = anchors if symmetric else candidates.to(anchors.dtype).contiguous()
    # 2n: both sides of every pair land on the one tensor, d anchors = dA + dC.
    want_a = bool(need_anchors or (symmetric and need_candidates))
    want_c = bool(need_candidates or (symmetric and need_anchors))
    want_b = bool(need_inv_temp and inv_temp is not None)
    scale = artanh_scale_arg(artanh_scale)
    d_a, d_c, d_b = _extension().backward(
        anchors, cands, cast_rows(inv_temp, anchors), pos_index.contiguous(),
        None if self_index is None else self_index.contiguous(), lse_neg.contiguous(),
        grad_lse_neg.to(lse_neg.dtype).contiguous(), scale, float(artanh_eps), operand,
        want_a, want_c, want_b)
    if symmetric:
        d_a, d_c = (d_a + d_c if want_a else None), None
    if d_b is not None and inv_temp is not None:
        d_b = d_b.to(inv_temp.dtype)
    return d_a, d_c, d_b


def negative_lse(anchors: torch.Tensor, candidates: torch.Tensor, inv_temp: Optional[torch.Tensor],
                 pos_index: torch.Tensor, self_index: Optional[torch.Tensor],
                 artanh_scale: Optional[float], artanh_eps: float, *,
                 operand_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The primitive's entry point (see torch_chunked.negative_lse). Computes in the dtype of
    ``anchors`` (float32, or float64 on a slow exact path); with float32 compute and
    ``operand_dtype`` bfloat16 / float16 the GEMMs run on tensor cores in that dtype."""
    if anchors.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the cuda backend computes in float32 or float64, got {anchors.dtype}")
    if anchors.device.type != "cuda" or candidates.device != anchors.device:
        raise ValueError(f"the cuda backend needs CUDA tensors on one device, got anchors on "
                         f"{anchors.device} and candidates on {candidates.device}")
    if artanh_scale is None and inv_temp is None:
        raise ValueError("the scaled logit map needs inv_temp")
    return _ops.negative_lse("cuda", anchors, None if candidates is anchors else candidates,
                             inv_temp, pos_index, self_index, artanh_scale, artanh_eps,
                             operand_dtype)
