"""Backend ``"triton"``'s glue: from a ``Problem`` to the launches of the kernel table
(``launch.py``) and back to ``Grads``; the ``Backend`` subclass and its instance ``BACKEND``.

What runs for which problem (the kernels and their GEMM counts: ``kernels.py``):

* cross layouts: ``forward`` (``lse_neg`` and, when a gradient is required, the anchor-side
  accumulator ``E``), then ``candidates`` for ``d_candidates``; the anchor side is a per-row
  scale of ``E`` here, no second pass over the tiles;
* layout ``2n`` (``Problem.symmetric`` and ``config.USE_SYMMETRY``): ``forward`` without ``E``,
  then ``candidates`` with ``MIRRORED`` (the rows' own entries as the mirrored side) for the
  one tensor's whole gradient;
* both directions (``Problem.both_directions``): ``both_forward`` and a merge of the columns'
  partials here, then ``both_backward`` (the candidates kernel with ``MIRRORED``, the columns'
  entries as the mirrored side) once per side whose gradient is needed;
* ``RowReduction.SOFTPLUS``: ``softplus_forward`` and ``softplus_candidates``.

Index tensors reach the kernels as int32 (``_operands``), labels as int64.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from ...protocol import (BUILD, ENVIRONMENT, WIDTH, Backend, Capabilities, Grads, LogitMap, Needs,
                         Options, Problem, Reason, RowReduction)
from . import config
from .config import (
    MAX_D, PRECISIONS, SHAPES, block_d_of, device_shared_limit, precision_class, shape_candidates,
    unavailable_reason,
)
from .launch import NoFittingShape, TritonResourceError, launch, launch_shape, refusal

# The kernel kinds of the shape tables (every kernel launches with its kind's shapes).
KERNEL_KINDS = tuple(sorted({kind for _, kind in SHAPES}))


class _Operands(NamedTuple):
    """What the kernels read: the operand copies of the rows (rounded to half precision for half
    inputs: plain data, the gradient flows through the problem's anchors/candidates), int32
    indices, and dummy pointers where a tensor is absent."""

    anchors: torch.Tensor
    candidates: torch.Tensor  # the anchors themselves when symmetric
    inv_temp: torch.Tensor  # a dummy (lse-sized) for ARTANH
    pos_index: torch.Tensor
    self_index: torch.Tensor  # pos_index as a dummy without HAS_SELF
    anchor_labels: torch.Tensor  # pos_index as a dummy without labels
    candidate_labels: torch.Tensor
    has_self: bool
    symmetric: bool  # the symmetric backward runs (a symmetric problem and config.USE_SYMMETRY)


def _operands(problem: Problem) -> _Operands:
    p = problem
    op_dtype = p.anchors.dtype
    if op_dtype == torch.float32 and p.operand_dtype in (torch.float16, torch.bfloat16):
        op_dtype = p.operand_dtype
    anchors = p.anchors.detach().to(op_dtype)
    candidates = anchors if p.symmetric else p.candidates.detach().to(op_dtype)
    pos_index = p.pos_index.to(torch.int32).contiguous()
    self_index = pos_index if p.self_index is None else p.self_index.to(torch.int32).contiguous()
    inv_temp = (p.anchors.new_empty(p.num_lse) if p.inv_temp is None
                else p.inv_temp.to(p.anchors.dtype).contiguous())
    anchor_labels = candidate_labels = pos_index
    if p.has_labels:  # int64: labels are arbitrary integers, never narrowed
        anchor_labels = p.anchor_labels.contiguous()
        candidate_labels = p.candidate_label_rows.contiguous()
    return _Operands(anchors, candidates, inv_temp, pos_index, self_index, anchor_labels,
                     candidate_labels, p.self_index is not None,
                     config.USE_SYMMETRY and p.symmetric)


def _flags(problem: Problem, ops: _Operands) -> dict:
    """The constexpr flags every launch shares."""
    op_dtype = ops.anchors.dtype
    return dict(LOGIT_MAP=int(problem.logit_map), HAS_SELF=ops.has_self,
                HAS_LABELS=problem.has_labels,
                DOT_PRECISION=PRECISIONS[precision_class(op_dtype)][2],
                UPCAST=config.INTERPRET and op_dtype == torch.bfloat16,
                BLOCK_D=block_d_of(problem.D))


def _logit_params(problem: Problem) -> torch.Tensor:
    """``[artanh_scale, artanh_eps]`` as a tensor of the compute dtype (float32, or float64 for
    float64 inputs): the kernels load them, so that float64 keeps ``1 - artanh_eps`` exact where
    a Python float argument would reach a compiled kernel as fp32."""
    return torch.tensor([float(problem.artanh_scale), float(problem.artanh_eps)],
                        dtype=problem.anchors.dtype, device=problem.anchors.device)


def _run_forward(problem: Problem, acc_e: bool):
    """``lse_neg`` and, when ``acc_e``, the anchor-side accumulator ``E`` (``None`` otherwise)."""
    ops = _operands(problem)
    M, K, D = problem.M, problem.K, problem.D
    lse_neg = problem.anchors.new_empty(M)
    E = problem.anchors.new_empty((M, D)) if acc_e else lse_neg
    artanh = problem.logit_map is LogitMap.ARTANH
    launch(
        "forward", M,
        (ops.anchors, ops.candidates, ops.inv_temp, ops.pos_index, ops.self_index, lse_neg, E,
         M, K, D, ops.anchors.stride(0), ops.candidates.stride(0), E.stride(0),
         _logit_params(problem), ops.anchor_labels, ops.candidate_labels),
        precision_class(ops.anchors.dtype),
        ACC_E=acc_e,
        # The SCALED map's weights exp(l - m) are <= 1: float16 holds them.
        WIDE_WEIGHTS=ops.anchors.dtype == torch.float16 and artanh,
        **_flags(problem, ops),
    )
    return lse_neg, (E if acc_e else None)


def _run_backward(problem: Problem, lse_neg, E, g, needs: Needs) -> Grads:
    """Symmetric (``config.USE_SYMMETRY``): one column-ordered, mirrored pass (the rows' own
    entries as the mirrored side: candidate ``k`` is anchor ``k``) gives the one tensor's whole
    gradient as ``d_anchors``. Otherwise the candidates' pass gives ``d_candidates`` and the
    forward's ``E`` the anchor side, a per-row scale."""
    ops = _operands(problem)
    M, K, D = problem.M, problem.K, problem.D
    g = g.to(problem.anchors.dtype).contiguous()
    d_anchors = d_candidates = d_inv_temp = None
    need_d_inv_temp = needs.d_inv_temp and problem.logit_map is LogitMap.SCALED
    if needs.d_candidates or (ops.symmetric and (needs.d_anchors or need_d_inv_temp)):
        d_rows = problem.anchors.new_empty((K, D))
        need_symmetric_d_inv_temp = ops.symmetric and need_d_inv_temp
        d_inv_temp_out = problem.anchors.new_empty(M) if need_symmetric_d_inv_temp else lse_neg
        # The mirrored entries are the rows' own (unused dummies when not symmetric).
        launch(
            "candidates", K,
            (ops.anchors, ops.candidates, ops.inv_temp, ops.pos_index, ops.self_index, lse_neg,
             g, ops.inv_temp, ops.pos_index, ops.self_index, lse_neg, g, d_rows,
             d_inv_temp_out, M, K, D, ops.anchors.stride(0), ops.candidates.stride(0),
             d_rows.stride(0), _logit_params(problem), ops.anchor_labels, ops.candidate_labels),
            precision_class(ops.anchors.dtype),
            MIRRORED=ops.symmetric, NEED_D_INV_TEMP=need_symmetric_d_inv_temp,
            WIDE_WEIGHTS=ops.anchors.dtype == torch.float16,
            **_flags(problem, ops),
        )
        if ops.symmetric:
            d_anchors = d_rows
            d_inv_temp = d_inv_temp_out if need_symmetric_d_inv_temp else None
        else:
            d_candidates = d_rows
    if not ops.symmetric and (needs.d_anchors or need_d_inv_temp):
        # Anchor side from the forward's E: a per-row scale, no second pass over the tiles.
        if problem.logit_map is LogitMap.ARTANH:
            d_anchors = g[:, None] * E if needs.d_anchors else None
        else:
            if needs.d_anchors:
                d_anchors = (g * ops.inv_temp)[:, None] * E
            if need_d_inv_temp:
                d_inv_temp = g * (problem.anchors * E).sum(dim=1)
    return Grads(d_anchors, d_candidates, d_inv_temp)


def _softplus_common(problem: Problem, ops: _Operands) -> dict:
    """The launch flags of the softplus kernels (no logit map: SCALED only)."""
    flags = _flags(problem, ops)
    del flags["LOGIT_MAP"], flags["HAS_LABELS"]  # SigLIP: SCALED map, no label mask
    flags["HAS_BIAS"] = problem.row_bias is not None
    return flags


def _row_bias(problem: Problem) -> torch.Tensor:
    """``row_bias`` in the compute dtype, or a valid dummy pointer (unused without HAS_BIAS)."""
    return (problem.inv_temp.to(problem.anchors.dtype).contiguous() if problem.row_bias is None
            else problem.row_bias.to(problem.anchors.dtype).contiguous())


def _run_softplus_forward(problem: Problem, acc_e: bool):
    """``sp_neg`` and, when ``acc_e``, ``aux = [E | sum sigmoid]`` (``[M, D + 1]``)."""
    ops = _operands(problem)
    M, K, D = problem.M, problem.K, problem.D
    sp_neg = problem.anchors.new_empty(M)
    E = problem.anchors.new_empty((M, D + 1)) if acc_e else sp_neg
    launch(
        "softplus_forward", M,
        (ops.anchors, ops.candidates, ops.inv_temp, _row_bias(problem), ops.pos_index,
         ops.self_index, sp_neg, E, M, K, D, ops.anchors.stride(0), ops.candidates.stride(0),
         E.stride(0) if acc_e else 0),
        precision_class(ops.anchors.dtype), ACC_E=acc_e, **_softplus_common(problem, ops),
    )
    return sp_neg, (E if acc_e else None)


def _run_softplus_backward(problem: Problem, E, g, needs: Needs) -> Grads:
    """The candidates' pass for ``d_candidates``; the anchor side from the forward's ``aux``."""
    ops = _operands(problem)
    M, K, D = problem.M, problem.K, problem.D
    g = g.to(problem.anchors.dtype).contiguous()
    d_anchors = d_candidates = d_inv_temp = d_row_bias = None
    if needs.d_candidates:
        d_candidates = problem.anchors.new_empty((K, D))
        launch(
            "softplus_candidates", K,
            (ops.anchors, ops.candidates, ops.inv_temp, _row_bias(problem), ops.pos_index,
             ops.self_index, g, d_candidates, M, K, D, ops.anchors.stride(0),
             ops.candidates.stride(0), d_candidates.stride(0)),
            precision_class(ops.anchors.dtype),
            # g_a inv_temp[a] sigmoid can exceed float16's range (loss-scaled upstreams).
            WIDE_WEIGHTS=ops.anchors.dtype == torch.float16,
            **_softplus_common(problem, ops),
        )
    if needs.d_anchors or needs.d_inv_temp or needs.d_row_bias:
        E_rows, sigmoid_sums = E[:, :D], E[:, D]
        if needs.d_anchors:
            d_anchors = (g * ops.inv_temp)[:, None] * E_rows
        if needs.d_inv_temp:
            d_inv_temp = g * (problem.anchors * E_rows).sum(dim=1)
        if needs.d_row_bias and problem.row_bias is not None:
            d_row_bias = g * sigmoid_sums
    return Grads(d_anchors, d_candidates, d_inv_temp, d_row_bias)


def _both_flags(problem: Problem, ops: _Operands) -> dict:
    """The both-directions kernels' flags: ``_ops`` never sends them labels."""
    flags = _flags(problem, ops)
    del flags["HAS_LABELS"]
    return flags


def _run_both_forward(problem: Problem) -> torch.Tensor:
    """``lse_neg [M + K]`` of a both-directions problem: one pass over the tiles for the rows'
    statistics and the columns' partials, then the partials merged in block order."""
    ops = _operands(problem)
    M, K, D = problem.M, problem.K, problem.D
    flags = _both_flags(problem, ops)
    precision = precision_class(ops.anchors.dtype)
    # BLOCK_M fixed before the launch (the columns' partials have one row per program), so this
    # kernel is not autotuned: the interpreter's block, or the table's default shape.
    shape = launch_shape("both_forward", precision, flags["BLOCK_D"], problem.anchors.device)
    blocks = (M + shape[0] - 1) // shape[0]  # program count (cdiv)
    lse_neg = problem.anchors.new_empty(M + K)
    # Extra memory: the columns' (the mirrored side's) partial max and sum, 2 x cdiv(M, BLOCK_M)
    # x K values.
    mirrored_max = problem.anchors.new_empty((blocks, K))
    mirrored_sum = problem.anchors.new_empty((blocks, K))
    launch(
        "both_forward", M,
        (ops.anchors, ops.candidates, ops.inv_temp, ops.pos_index, ops.self_index,
         ops.inv_temp[M:], ops.pos_index[M:], ops.self_index[M:], lse_neg, mirrored_max,
         mirrored_sum, M, K, D, ops.anchors.stride(0), ops.candidates.stride(0),
         _logit_params(problem)),
        precision, shape=shape, **flags)
    # The merge (the "second tiny pass"): per column, the max over blocks and the sum of each
    # block's partial sum rescaled to it; a fixed order of reduction, no atomics.
    top = mirrored_max.amax(dim=0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    total = (mirrored_sum * torch.exp(mirrored_max - shift)).sum(dim=0)
    lse_neg[M:] = torch.where(total > 0, shift + torch.log(total), float("-inf"))
    return lse_neg


def _run_both_backward(problem: Problem, lse_neg, g, needs: Needs) -> Grads:
    """Both directions' gradients: one column-ordered pass per side that needs one. The side
    whose gradient a pass writes is the kernel's "candidates", every tile's mirrored side (its
    entries are the ``mirrored_*`` arguments); the other side is the kernel's "anchors", the row
    side. For ``d_anchors`` the two swap roles: the anchors are the kernel's candidates."""
    ops = _operands(problem)
    M, K, D = problem.M, problem.K, problem.D
    g = g.to(problem.anchors.dtype).contiguous()
    need_d_inv_temp = needs.d_inv_temp and problem.logit_map is LogitMap.SCALED
    d_inv_temp = problem.anchors.new_empty(M + K) if need_d_inv_temp else None
    anchor_half = slice(0, M)
    candidate_half = slice(M, M + K)
    out = {}
    # (the gradient; the mirrored side's rows and per-anchor entries; the row side's)
    for name, mirrored, mirrored_half, rows, rows_half, wanted in (
            ("d_anchors", ops.anchors, anchor_half, ops.candidates, candidate_half,
             needs.d_anchors),
            ("d_candidates", ops.candidates, candidate_half, ops.anchors, anchor_half,
             needs.d_candidates)):
        if not (wanted or need_d_inv_temp):
            continue
        n_mirrored, n_rows = mirrored.shape[0], rows.shape[0]
        d_mirrored = problem.anchors.new_empty((n_mirrored, D))
        d_inv_temp_mirrored = d_inv_temp[mirrored_half] if need_d_inv_temp else lse_neg
        launch(
            "both_backward", n_mirrored,
            (rows, mirrored,
             ops.inv_temp[rows_half], ops.pos_index[rows_half], ops.self_index[rows_half],
             lse_neg[rows_half], g[rows_half],
             ops.inv_temp[mirrored_half], ops.pos_index[mirrored_half],
             ops.self_index[mirrored_half], lse_neg[mirrored_half], g[mirrored_half],
             d_mirrored, d_inv_temp_mirrored, n_rows, n_mirrored, D, rows.stride(0),
             mirrored.stride(0), d_mirrored.stride(0), _logit_params(problem),
             ops.pos_index, ops.pos_index),  # label pointers: unused dummies (no labels)
            precision_class(ops.anchors.dtype),
            MIRRORED=True, HAS_LABELS=False, NEED_D_INV_TEMP=need_d_inv_temp,
            WIDE_WEIGHTS=ops.anchors.dtype == torch.float16,
            **_both_flags(problem, ops),
        )
        out[name] = d_mirrored if wanted else None
    return Grads(out.get("d_anchors"), out.get("d_candidates"), d_inv_temp)


def _accumulates_e(problem: Problem, need_grad: bool) -> bool:
    # E serves the anchor side (and d_inv_temp) of a non-symmetric pass; the symmetric backward
    # gets everything from its one pass.
    return need_grad and not (config.USE_SYMMETRY and problem.symmetric)


class TritonBackend(Backend):
    """Triton kernels: on a GPU, or in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""

    name = "triton"
    # Whole rows live in a tile: D <= MAX_D (on a GPU the shape tables cap it lower per operand
    # precision: not_supported_reasons below). The CPU only under the interpreter: the
    # environment (``config.unavailable_reason``) says so.
    capabilities = Capabilities(devices=("cuda", "cpu"), dtypes=(torch.float32, torch.float64),
                                max_d=MAX_D, half_operands=True)

    def environment_reason(self, device: Optional[torch.device]) -> Optional[Reason]:
        reason = unavailable_reason(device)
        return None if reason is None else Reason(reason, ENVIRONMENT)

    def not_supported_reasons(self, device=None, dtype=None, D=None,
                              options: Optional[Options] = None) -> List[Reason]:
        """The data's reasons; then, on a GPU, a width no measured tile shape serves for the
        operand precision (it would spill or not fit the shared memory). With
        ``options.shared_limit`` the GPU is a target (the kernel inventory's): its shared memory
        is that, and this process's environment is not asked."""
        reasons = super().not_supported_reasons(device, dtype, D, options)
        target_limit = None if options is None else options.shared_limit
        if target_limit is not None:
            reasons = [r for r in reasons if r.kind not in (ENVIRONMENT, BUILD)]
        if reasons or device is None or dtype is None or D is None:
            return reasons
        operand = dtype
        if (dtype == torch.float32 and options is not None
                and options.operand_dtype in (torch.float16, torch.bfloat16)):
            operand = options.operand_dtype
        refused = self._shape_refusal(D, operand, device, target_limit)
        return [] if refused is None else [Reason(refused, WIDTH)]

    @staticmethod
    def _shape_refusal(d: int, op_dtype: torch.dtype, device: torch.device,
                       shared_limit: Optional[int] = None) -> Optional[str]:
        """On a GPU: why no measured tile shape serves width ``d`` with ``op_dtype`` operands
        (``None`` when one does): the rule the launcher applies, one kernel kind at a time, for
        every kind at once (a call launches both). ``shared_limit``: a target GPU's shared
        memory per block (the kernel inventory asks about sm_80 / sm_90 from any machine);
        ``None``: ``device``'s. The interpreter has no registers or shared memory to run out of
        and accepts every width up to ``MAX_D``."""
        if device.type != "cuda" or (shared_limit is None and config.INTERPRET):
            return None
        precision = precision_class(op_dtype)
        limit = device_shared_limit(device) if shared_limit is None else shared_limit
        # Width by width, not up to a widest one: a smaller GPU's shared memory can drop a
        # width's only shape (float32 tf32 at BLOCK_D 512 on an A100) and keep a wider one's.
        block_d = block_d_of(d)
        if all(shape_candidates(kind, precision, block_d, limit) for kind in KERNEL_KINDS):
            return None
        return refusal(precision, d, limit)

    def fwd(self, problem: Problem, need_grad: bool):
        if problem.both_directions:
            return _run_both_forward(problem), None
        if problem.row_reduction is RowReduction.SOFTPLUS:
            return _run_softplus_forward(problem, need_grad)
        return self._forward(problem, _accumulates_e(problem, need_grad))

    def _forward(self, problem: Problem, acc_e: bool):
        if problem.anchors.dtype == torch.float64 and problem.anchors.device.type == "cuda":
            try:
                return _run_forward(problem, acc_e)
            except (torch.cuda.OutOfMemoryError, TritonResourceError, NoFittingShape):
                raise
            except Exception as exc:  # a Triton build without float64 tl.dot for this GPU
                raise TypeError(
                    f"the triton backend could not compile its float64 kernels on this GPU "
                    f"({type(exc).__name__}: {str(exc)[:200]}); use backend='torch' for float64"
                ) from exc
        return _run_forward(problem, acc_e)

    def fwd_eqs(self, problem: Problem, need_grad: bool):
        # eqs from the forward's anchor-side accumulator: E_a = sum_k Q_ak u_k, so
        # eqs[a] = sum_k Q_ak S_ak = u_a . E_a (SCALED), no second pass over the tiles.
        lse_neg, E = self._forward(problem, True)
        eqs = (problem.anchors.detach() * E).sum(dim=1)
        return lse_neg, (E if _accumulates_e(problem, need_grad) else None), eqs

    def bwd(self, problem: Problem, lse_neg, aux, g, needs: Needs) -> Grads:
        if problem.row_reduction is RowReduction.SOFTPLUS:
            return _run_softplus_backward(problem, aux, g, needs)
        if problem.both_directions:
            return _run_both_backward(problem, lse_neg, g, needs)
        return _run_backward(problem, lse_neg, aux, g, needs)

    def fake_aux(self, problem: Problem, need_grad: bool):
        if problem.row_reduction is RowReduction.SOFTPLUS:
            return problem.anchors.new_empty((problem.M, problem.D + 1)) if need_grad else None
        return problem.anchors.new_empty(problem.anchors.shape) \
            if _accumulates_e(problem, need_grad) and not problem.both_directions else None


BACKEND = TritonBackend()
