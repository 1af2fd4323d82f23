"""Backend ``"cuda"``: the CUDA C++ kernels of ``csrc/cuda/macl_cuda.cu`` (extension
``macl_kernels._C_cuda``, built by ``setup.py`` when torch is a CUDA build and nvcc is present).

The primitive of ``docs/math.md#the-primitive`` (per-row ``lse_neg``; recompute in backward), as
a tiled forward kernel and one backward launch whose anchor blocks produce ``d_anchors`` and
``d_inv_temp`` and whose candidate blocks produce ``d_candidates`` (no atomics: deterministic).
A symmetric problem returns both sides; ``_ops`` folds them. A both-directions problem (layout
``cross_sym`` on one process) computes each tile of ``S`` once per pass for its rows and its
columns: the forward merges the columns' per-anchor-block partial statistics in a second, tiny
pass, the backward forms both directions' ``dL_dS`` from one recompute (float64: the plain path
runs the two directions as two launches).

Precision: statistics and gradients are float32 for float32 / bfloat16 / float16 inputs. The
GEMM operands are the inputs' precision (``operand_dtype``): float32 runs on CUDA cores with fp32
FMA; bfloat16 / float16 are rounded back to that dtype and run on tensor cores (WMMA, fp32
accumulation), as the user's data already was. float64 inputs take a plain, untiled float64
path: exact but slow (use backend ``"torch"`` when float64 speed matters).

``RowReduction.SOFTPLUS`` (SigLIP) runs the sibling launchers ``softplus_forward`` /
``softplus_backward`` of the same file (same tiles and blocks, ``d_row_bias`` from the anchor
blocks).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..protocol import (BUILD, ENVIRONMENT, Backend, Capabilities, Grads, Needs, Problem,
                        Reason, RowReduction)
from ._native import Extension, cast_rows

_EXTENSION = Extension("macl_kernels._C_cuda")

# MaclOperand codes of csrc/cuda/macl_cuda.h.
_OPERAND_F32, _OPERAND_F16, _OPERAND_BF16, _OPERAND_F64 = 0, 1, 2, 3
_HALF_OPERANDS = {torch.float16: _OPERAND_F16, torch.bfloat16: _OPERAND_BF16}

_REBUILD = ("rebuild the extension against it: `pip install --no-build-isolation --no-deps -e .` "
            "in the source tree")


def _operand_code(problem: Problem) -> int:
    if problem.anchors.dtype == torch.float64:
        return _OPERAND_F64
    return _HALF_OPERANDS.get(problem.operand_dtype, _OPERAND_F32)


class CudaBackend(Backend):
    name = "cuda"
    capabilities = Capabilities(devices=("cuda",), dtypes=(torch.float32, torch.float64),
                                half_operands=True, build="aot")

    @property
    def extension(self) -> Extension:
        return _EXTENSION

    def environment_reason(self, device: Optional[torch.device]) -> Optional[Reason]:
        if getattr(torch.version, "hip", None):
            return Reason(f"this torch ({torch.__version__}) is a ROCm build; the cuda backend "
                          f"needs NVIDIA CUDA (use backend='triton' or 'torch')", ENVIRONMENT)
        if not torch.version.cuda:
            return Reason(f"this torch ({torch.__version__}) is a CPU build: install a CUDA build "
                          f"of PyTorch, then {_REBUILD}", ENVIRONMENT)
        if not torch.cuda.is_available():
            return Reason("no CUDA device is available (torch.cuda.is_available() is False)",
                          ENVIRONMENT)
        if _EXTENSION.get() is None:
            # Ahead of time only: nvcc builds take minutes and need the CUDA toolkit.
            return Reason(
                f"the CUDA extension {_EXTENSION.name} was not built or could not be imported "
                f"({_EXTENSION.error}); with a CUDA build of torch (here: torch "
                f"{torch.__version__}, CUDA {torch.version.cuda}) and nvcc installed, {_REBUILD}",
                BUILD)
        return None

    def check(self, problem: Problem) -> None:
        super().check(problem)
        anchors, candidates = problem.anchors, problem.candidate_rows
        if candidates.device != anchors.device:
            raise ValueError(f"the cuda backend needs CUDA tensors on one device, got anchors "
                             f"on {anchors.device} and candidates on {candidates.device}")

    def fwd(self, problem: Problem, need_grad: bool):
        p = problem
        if p.row_reduction is RowReduction.SOFTPLUS:
            sp_neg = _EXTENSION.get().softplus_forward(
                p.anchors, p.candidate_rows.to(p.anchors.dtype), cast_rows(p.inv_temp, p.anchors),
                cast_rows(p.row_bias, p.anchors), p.pos_index, p.self_index, _operand_code(p))
            return sp_neg, None
        lse_neg = _EXTENSION.get().forward(
            p.anchors, p.candidate_rows.to(p.anchors.dtype), cast_rows(p.inv_temp, p.anchors),
            p.pos_index, p.self_index, int(p.logit_map), p.artanh_scale, p.artanh_eps,
            _operand_code(p), p.both_directions, p.anchor_labels, p.candidate_label_rows)
        return lse_neg, None

    def bwd(self, problem: Problem, lse_neg, aux, g, needs: Needs) -> Grads:
        p = problem
        if p.row_reduction is RowReduction.SOFTPLUS:  # no forward statistic needed
            return Grads(*_EXTENSION.get().softplus_backward(
                p.anchors, p.candidate_rows.to(p.anchors.dtype), cast_rows(p.inv_temp, p.anchors),
                cast_rows(p.row_bias, p.anchors), p.pos_index, p.self_index,
                g.to(p.anchors.dtype).contiguous(), _operand_code(p), needs.d_anchors,
                needs.d_candidates, needs.d_inv_temp, needs.d_row_bias))
        d_anchors, d_candidates, d_inv_temp = _EXTENSION.get().backward(
            p.anchors, p.candidate_rows.to(p.anchors.dtype), cast_rows(p.inv_temp, p.anchors),
            p.pos_index, p.self_index, lse_neg.contiguous(), g.to(lse_neg.dtype).contiguous(),
            int(p.logit_map), p.artanh_scale, p.artanh_eps, _operand_code(p), p.both_directions,
            needs.d_anchors, needs.d_candidates, needs.d_inv_temp, p.anchor_labels,
            p.candidate_label_rows)
        return Grads(d_anchors, d_candidates, d_inv_temp)


BACKEND = CudaBackend()
