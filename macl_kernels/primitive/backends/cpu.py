"""Backend ``"cpu"``: the fused C++ kernels of ``csrc/cpu/`` (extension
``macl_kernels._C_cpu``, built by ``setup.py``, or on first use from the packaged sources:
``_native.py``).

The primitive of ``docs/math.md#the-primitive`` (per-row ``lse_neg``; recompute in backward),
tiled in C++ over ``at::parallel_for``. A symmetric problem (layout ``2n`` on one process)
computes only the tiles on and above the diagonal, each for its rows and its columns, and the
kernel returns the one tensor's whole gradient as ``d_anchors``. A both-directions problem
(layout ``cross_sym`` on one process) computes every tile once for its rows and its columns.
float32 and float64; half inputs reach it upcast to float32 by the losses.

``RowReduction.SOFTPLUS`` (SigLIP, ``docs/math.md#siglip``): ``softplus_forward`` sums
``softplus(l)`` over the same tiles; when a gradient will be needed it also accumulates, in the
same pass, the gradients' tile products without the upstream ``g`` (``sigmoid`` needs no row
statistic): ``aux = [E (M x D) | sum sigmoid (M) | sum sigmoid S (M) | F (K x D)]``. Backward is
then a per-row scale by ``g``, and ``d_candidates = c F`` when ``g`` is one constant ``c`` (a
mean or a sum): 3 GEMMs in all, the minimum. Another ``g`` recomputes the candidate side
(``softplus_backward``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..protocol import (BUILD, Backend, Capabilities, Grads, Needs, Problem, Reason,
                        RowReduction)
from . import _native
from ._native import Extension, cast_rows

# Ahead of time (setup.py), or built on first use from csrc/cpu (_native.py).
_EXTENSION = Extension("macl_kernels._C_cpu", jit_part="cpu")


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(devices=("cpu",), dtypes=(torch.float32, torch.float64),
                                build="aot+jit")

    @property
    def extension(self) -> Extension:
        return _EXTENSION

    def environment_reason(self, device: Optional[torch.device]) -> Optional[Reason]:
        state = _EXTENSION.state()
        if state.status != _native.MISSING:
            return None  # built, or built when first needed
        # ``detail`` says why the first-use build cannot run and what it needs (a wheel user's
        # remedy); the ahead-of-time build is for a source checkout.
        return Reason(f"the C++ extension is missing: {state.detail}; or, in a source checkout, "
                      f"build it ahead of time with `pip install --no-build-isolation -e .` (or "
                      f"`make install`)", BUILD)

    def _forward(self, p: Problem, need_eqs: bool):
        return _EXTENSION.get().forward(
            p.anchors, p.candidate_rows, cast_rows(p.inv_temp, p.anchors), p.pos_index,
            p.self_index, int(p.logit_map), p.artanh_scale, p.artanh_eps, p.symmetric,
            p.both_directions, p.anchor_labels, p.candidate_label_rows, need_eqs)

    def fwd(self, problem: Problem, need_grad: bool):
        p = problem
        if p.row_reduction is RowReduction.SOFTPLUS:
            sp_neg, aux = _EXTENSION.get().softplus_forward(
                p.anchors, p.candidates, cast_rows(p.inv_temp, p.anchors),
                cast_rows(p.row_bias, p.anchors), p.pos_index, p.self_index, need_grad)
            return sp_neg, aux
        return self._forward(problem, False)[0], None

    def fwd_eqs(self, problem: Problem, need_grad: bool):
        # The extra online accumulator of the one forward pass (docs/math.md#per-row-statistic-eqs).
        lse_neg, eqs = self._forward(problem, True)
        return lse_neg, None, eqs

    def bwd(self, problem: Problem, lse_neg, aux, g, needs: Needs) -> Grads:
        p = problem
        if p.row_reduction is RowReduction.SOFTPLUS:
            return _softplus_backward(p, aux, g.to(p.anchors.dtype).contiguous(), needs)
        d_anchors, d_candidates, d_inv_temp = _EXTENSION.get().backward(
            p.anchors, p.candidate_rows, cast_rows(p.inv_temp, p.anchors), p.pos_index,
            p.self_index, lse_neg, g.to(p.anchors.dtype).contiguous(), int(p.logit_map),
            p.artanh_scale, p.artanh_eps, p.symmetric, p.both_directions, needs.d_anchors,
            needs.d_candidates, needs.d_inv_temp, p.anchor_labels, p.candidate_label_rows)
        # Symmetric: the kernel has summed both sides of every pair into d_anchors.
        return Grads(d_anchors, None if p.symmetric else d_candidates, d_inv_temp)

    def fake_aux(self, problem: Problem, need_grad: bool):
        if problem.row_reduction is RowReduction.SOFTPLUS and need_grad:
            return problem.anchors.new_empty(
                ((problem.M + problem.K) * problem.D + 2 * problem.M,))
        return None


def _softplus_backward(p: Problem, aux, g, needs: Needs) -> Grads:
    """The softplus reduction's gradients from the forward's ``aux`` (see the module docstring);
    the candidate side by a recompute pass when ``g`` is not one constant."""
    M, K, D = p.M, p.K, p.D
    E = aux[:M * D].view(M, D)
    sigmoid_sum, sigmoid_S = aux[M * D:M * D + M], aux[M * D + M:M * D + 2 * M]
    F = aux[M * D + 2 * M:].view(K, D)
    d_anchors = g[:, None] * E if needs.d_anchors else None
    d_inv_temp = g * sigmoid_S if needs.d_inv_temp else None
    d_row_bias = g * sigmoid_sum if needs.d_row_bias and p.row_bias is not None else None
    d_candidates = None
    if needs.d_candidates:
        # A mean or a sum (g one constant): c F, no second pass. Reading g here is what the C++
        # kernels do with every input: this backend's tensors live on the host, so no device
        # synchronises (the default path of a GPU backend never reads data on the host).
        if M > 0 and torch.equal(g, g[:1].expand(M)):
            d_candidates = g[0] * F
        else:
            _, d_candidates, _, _ = _EXTENSION.get().softplus_backward(
                p.anchors, p.candidates, cast_rows(p.inv_temp, p.anchors),
                cast_rows(p.row_bias, p.anchors), p.pos_index, p.self_index, g, False, True,
                False, False)
    return Grads(d_anchors, d_candidates, d_inv_temp, d_row_bias)


BACKEND = CpuBackend()
