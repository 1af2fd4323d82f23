"""Backend ``"cpu"``: the fused C++ kernels of ``csrc/cpu/macl_cpu.cpp`` (extension
``macl_kernels._C_cpu``, built by ``setup.py``).

The primitive of ``docs/math.md#the-primitive`` (per-row ``lse_neg``; recompute in backward),
tiled in C++ over ``at::parallel_for``. A symmetric problem (layout ``2n`` on one process)
computes only the tiles on and above the diagonal, each for its rows and its columns, and the
kernel returns the one tensor's whole gradient as ``d_anchors``. A both-directions problem
(layout ``cross_sym`` on one process) computes every tile once for its rows and its columns.
float32 and float64; half inputs reach it upcast to float32 by the losses.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._primitive import Backend, Grads, Needs, Problem
from ._native import Extension, cast_rows

_EXTENSION = Extension("macl_kernels._C_cpu")


class CpuBackend(Backend):
    name = "cpu"
    native = True
    both_directions = True

    def built(self) -> bool:
        return _EXTENSION.get() is not None

    def missing_build(self, device: Optional[torch.device]) -> bool:
        return (device is None or device.type == "cpu") and not self.built()

    def unavailable_reason(self, device: Optional[torch.device]) -> Optional[str]:
        if device is not None and device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only (got {device})"
        if _EXTENSION.get() is None:
            return (
                f"the C++ extension {_EXTENSION.name} could not be imported ({_EXTENSION.error}); "
                f"build it with `pip install --no-build-isolation -e .` (or `make install`) in "
                f"the source tree")
        return None

    def check(self, problem: Problem) -> None:
        super().check(problem)
        if problem.anchors.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the cpu backend computes in float32 or float64, got "
                            f"{problem.anchors.dtype}")

    def fwd(self, problem: Problem, need_grad: bool):
        p = problem
        lse_neg = _EXTENSION.get().forward(
            p.anchors, p.candidate_rows, cast_rows(p.inv_temp, p.anchors), p.pos_index,
            p.self_index, int(p.logit_map), p.artanh_scale, p.artanh_eps, p.symmetric,
            p.both_directions)
        return lse_neg, None

    def bwd(self, problem: Problem, lse_neg, aux, g, needs: Needs) -> Grads:
        p = problem
        d_anchors, d_candidates, d_inv_temp = _EXTENSION.get().backward(
            p.anchors, p.candidate_rows, cast_rows(p.inv_temp, p.anchors), p.pos_index,
            p.self_index, lse_neg, g.to(p.anchors.dtype).contiguous(), int(p.logit_map),
            p.artanh_scale, p.artanh_eps, p.symmetric, p.both_directions, needs.d_anchors,
            needs.d_candidates,
            needs.d_inv_temp)
        # Symmetric: the kernel has summed both sides of every pair into d_anchors.
        return Grads(d_anchors, None if p.symmetric else d_candidates, d_inv_temp)


BACKEND = CpuBackend()
