"""Backend ``"triton"``: the shared primitive as fused Triton kernels (GPU, or Triton's CPU
interpreter with ``TRITON_INTERPRET=1``).

The math: ``docs/math.md#the-primitive``, in the glossary of ``docs/design.md``. For anchor row
``a`` and candidate ``k`` (rows already L2-normalised),

    S_ak     = anchors[a] . candidates[k]
    l_ak     = inv_temp[a] * S_ak                           (LOGIT_MAP == SCALED)
             = artanh_scale * artanh(clamp(S_ak, -1 + artanh_eps, 1 - artanh_eps))   (ARTANH)
    lse_neg  = log sum_{k in Neg(a)} exp(l_ak)              Neg(a): all k but p(a) and self(a)
    Q_ak     = exp(l_ak - lse_neg[a])                       (0 off Neg(a))

Backward, for an upstream gradient ``g`` of ``lse_neg``: ``dL_dS_ak = g_a Q_ak dl_dS_ak`` with
the slope ``dl_dS_ak = inv_temp[a]`` (SCALED) or ``artanh_scale / (1 - S_ak^2)`` inside the clamp
and 0 outside (ARTANH: self and duplicates sit at ``S = +-1``, outside the clamp, so their slope is
a finite 0, never ``0 * inf``), and

    d_anchors[a]    = sum_k dL_dS_ak u_k        d_candidates[k] = sum_a dL_dS_ak u_a
    d_inv_temp[a]   = g_a sum_k Q_ak S_ak       (SCALED only)

Both ``Q`` and ``dL_dS`` are recomputed from the saved per-row ``lse_neg`` (FlashAttention's pattern);
nothing of size ``M x K`` is ever stored.

Passes and GEMM work (one "GEMM" = ``2 M K D`` flops over the whole ``M x K`` tile grid):

* cross layouts (``anchors`` and ``candidates`` differ), gradients required:
  - forward (``_forward_kernel``, one program per block of anchor rows, streaming candidate
    tiles): ``S = A C^T`` (1 GEMM), the online max/sum for ``lse_neg`` and, rescaled online like
    attention's output, ``E_a = sum_k Q_ak dl_dS_ak u_k`` for ARTANH (``E_a = sum_k Q_ak u_k``
    for SCALED) with a second ``tl.dot`` (1 GEMM). Then the anchor side of backward is a per-row
    scale: ``d_anchors = g_a inv_temp[a] E_a`` (ARTANH: ``g_a E_a``) and
    ``d_inv_temp[a] = g_a anchors[a] . E_a``.
  - backward (``_candidates_kernel``, one program per block of candidates looping over every
    anchor block: column-ordered, no atomics, deterministic): recompute ``S^T`` (1 GEMM), form
    ``dL_dS^T`` from the saved statistics, accumulate ``dL_dS^T anchors`` (1 GEMM).
  Total 2 passes, 4 GEMMs (``8 M K D`` flops); 1 GEMM when no gradient is required.
* layout ``2n`` on one process (``anchors is candidates``, ``S`` symmetric): the forward keeps
  only ``lse_neg`` (1 GEMM); the backward's column-ordered pass builds, from one recompute of the
  tile, both ``dL_dS_ak`` (column side, anchor ``a``'s statistics) and ``dL_dS_ka`` (row side,
  candidate ``k``'s own statistics, since ``S_ka = S_ak``) and accumulates the one tensor's whole
  gradient ``(dL_dS + dL_dS^T) U`` (1 GEMM), plus ``d_inv_temp`` of the row side. Total 2 passes, 3 GEMMs (``6 M^2 D`` flops) instead of 4 - the
  symmetry saves the anchor-side accumulation. (The forward still computes each off-diagonal tile
  for both of its row blocks: sharing it there needs a cross-program merge of online statistics.)
  Whether this wins on a GPU is for the benchmark to say (``bench/bench_triton_gpu.py``, backend
  ``triton_nosym`` turns it off via ``USE_SYMMETRY``): at D = 128 in bf16 a tile's ``exp`` work is
  comparable to its GEMM work, and the symmetric backward evaluates two exponentials per element
  (rows' and columns' ``Q``) where the general path's backward evaluates one (3 vs 2 over both
  passes), against 3 vs 4 GEMMs.
* layout ``cross_sym`` on one process (``Problem.both_directions``: CLIP's two directions):
  ``_both_forward_kernel`` computes each tile once for the rows' online statistics and stores
  each column's partial (max, sum) per row block; a tiny merge in block order gives the columns'
  ``lse_neg`` (no atomics; extra memory ``2 K cdiv(M, BLOCK_M)``). Backward: ``_both_backward_kernel``
  once per side (rows' gradient, columns' gradient), each forming both directions' ``dL_dS`` from
  one recompute of the tile. 5 GEMMs of ``N x N x D`` instead of 2 x 4 as two cross blocks
  (docs/math.md#both-directions-of-one-s-layout-cross_sym).

* ``RowReduction.SOFTPLUS`` (SigLIP, ``docs/math.md#siglip``), cross problems, SCALED map, with a
  per-row bias: sibling kernels sharing the helpers. ``_softplus_forward_kernel`` sums
  ``softplus(l)`` per row (no running max: a plain sum) and, when a gradient is required,
  accumulates ``E_a = sum_k sigmoid(l_ak) u_k`` (1 GEMM) and ``sum_k sigmoid(l_ak)`` into
  ``aux [M, D + 1]`` - no rescaling, since ``sigmoid`` needs no row statistic. The anchor side is
  then a per-row scale (``d_anchors = g_a inv_temp[a] E_a``, ``d_inv_temp = g_a anchors[a] .
  E_a``, ``d_row_bias = g_a sum_k sigmoid``); ``_softplus_candidates_kernel`` is the
  column-ordered candidate pass. 2 passes, 4 GEMMs (``8 M K D`` flops), as the cross LSE path.

Extra memory: ``lse_neg`` (``M``), ``E`` (``M x D``, only when a gradient is required), the
rounded half-precision operands (``(M + K) x D``, half inputs only), the gradients: ``O((M+K) D)``.

Precision: statistics, ``E`` and every accumulator are float32 (float64 for float64 inputs).
Half-precision inputs (``operand_dtype`` float16/bfloat16) are rounded back to that dtype for the
``tl.dot`` operands (tensor cores, fp32 accumulation), except that with float16 the weight GEMMs
(``Q dl_dS`` and ``dL_dS`` against rows) run in tf32: those weights can exceed float16's 65504 (artanh
slopes, loss-scaled upstream gradients), tf32 has float32's range and float16's mantissa. float32
operands run 3xTF32 at torch's default matmul precision ("highest": about float32's accuracy,
docs/math.md#tolerances) and plain tf32 when ``torch.get_float32_matmul_precision()`` allows it.
float64 runs as float64 ``tl.dot`` (exact to float64 rounding; on a GPU it is slow, FMA-based -
use it to check, not to train). The artanh map's scalars arrive as a tensor of the compute dtype
and row offsets are 64-bit (``row * stride`` passes 2^31 for large candidate banks).

GPU tile shapes: measured per precision, kernel kind and width (``_SHAPES``, below; at most 1 KB
of spill, within an H100's shared memory); a width without a shape is refused on a GPU.

Tested: under the interpreter against the float64 reference (every loss, layout, reduction;
fp32 / fp64 / bf16 / fp16); the compiled kernels are built for sm_90 without a GPU by
``tests/test_triton_backend.py`` and inventoried by ``tests/test_kernel_inventory.py``
(``macl-kernels kernels``, Triton's bundled ptxas); the GPU tests there, in
``tests/test_gpu_smoke.py`` and in
``tests/test_primitive.py`` run them for real.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from ..protocol import Backend, Grads, LogitMap, Needs, Problem, RowReduction

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Triton decides at decoration time whether a kernel is compiled or interpreted, so the mode the
# kernels below were built in is the environment's at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Under the interpreter every program runs in NumPy, one at a time, and each tile operation costs
# a Python-level dispatch: one fixed config, no autotuning. 32 x 32 runs MACL 2n at N = 64, D = 32
# forward+backward in ~0.3 s on the 2-core CI machine (16 x 16: ~1.8 s; 64 x 64: ~0.14 s, but then
# small test batches would fit one tile and the multi-tile paths go untested). The test file
# lowers it to 16, tl.dot's minimum, to cross many tile edges at small sizes.
INTERPRETER_BLOCK_M = 32
INTERPRETER_BLOCK_N = 32

# Whole-D tiles (``BLOCK_D`` = next power of two >= max(D, 16)) live in registers/shared memory;
# above this the accumulators would not fit any tile shape, so we refuse rather than spill badly.
# On a GPU the shape tables (``_SHAPES``) cap the width lower for some precisions (float32 128,
# float64 512); the interpreter accepts every width up to this.
MAX_D = 1024

# Exploit layout 2n's symmetric S in backward ((G + G^T) U in one pass). A switch only so that the
# benchmark can measure what it buys; there is no reason to turn it off otherwise.
USE_SYMMETRY = True

# GPU only: pick BLOCK_M/BLOCK_N/num_warps/num_stages by triton.autotune (keyed on BLOCK_D, the
# flags and the dtypes; the first call per key benchmarks every fitting config). Off
# (MACL_TRITON_AUTOTUNE=0): one default shape per D, compiled once - for test runs.
AUTOTUNE = os.environ.get("MACL_TRITON_AUTOTUNE", "1") != "0"


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    """``None`` when the Triton kernels can run on ``device``, else why not and what to do."""
    if _IMPORT_ERROR is not None:
        return (f"triton could not be imported ({_IMPORT_ERROR}); install it with "
                f"`pip install triton` (it ships with CUDA builds of PyTorch on Linux)")
    if device is not None and device.type == "cuda":
        if _INTERPRET:
            return ("the Triton kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 "
                    "when macl_kernels' triton backend was imported); unset it for CUDA tensors")
        return None
    if device is None and not _INTERPRET and torch.cuda.is_available():
        return None  # "usable here": on this machine's GPU
    if device is None or device.type == "cpu":
        if _INTERPRET:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after macl_kernels' triton backend was imported; "
                    "set it before importing macl_kernels to run the kernels on the CPU")
        return ("the Triton kernels need a CUDA device; on the CPU they run only in Triton's "
                "interpreter (slow, for testing): set TRITON_INTERPRET=1 before importing "
                "macl_kernels, or use backend='cpu' / 'torch'")
    return f"the triton backend runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}"


if triton is not None:
    # LogitMap's values as Triton constants (macl_kernels/_primitive.py): ``LOGIT_MAP`` is a
    # constexpr, so each map compiles to its own kernel with the other branch removed.
    LOGIT_MAP_SCALED = tl.constexpr(int(LogitMap.SCALED))
    LOGIT_MAP_ARTANH = tl.constexpr(int(LogitMap.ARTANH))

    @triton.jit
    def _logit(S, inv_temp, artanh_scale, artanh_eps, LOGIT_MAP: tl.constexpr):
        """``l = inv_temp * S`` or ``artanh_scale * artanh(clamp(S))``; ``inv_temp`` comes
        broadcast to ``S``'s shape."""
        if LOGIT_MAP == LOGIT_MAP_ARTANH:
            x = tl.minimum(tl.maximum(S, -1.0 + artanh_eps), 1.0 - artanh_eps)
            return (0.5 * artanh_scale) * tl.log((1.0 + x) / (1.0 - x))
        else:
            return inv_temp * S

    @triton.jit
    def _dl_dS(S, inv_temp, artanh_scale, artanh_eps, LOGIT_MAP: tl.constexpr):
        """The slope ``dl_dS``: ``inv_temp``, or ``artanh_scale / (1 - S^2)`` inside the clamp
        and 0 where it clamps (self and duplicates at ``S = +-1``): a finite 0, so a zero ``Q``
        there never meets an infinity."""
        if LOGIT_MAP == LOGIT_MAP_ARTANH:
            inside = tl.abs(S) < 1.0 - artanh_eps
            return tl.where(inside, artanh_scale / tl.where(inside, 1.0 - S * S, 1.0), 0.0)
        else:
            return inv_temp

    @triton.jit
    def _weights_dot(w, y, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     WIDE_WEIGHTS: tl.constexpr):
        """``w @ y`` for the weight GEMMs (``Q dl_dS`` in forward, ``dL_dS`` in backward).
        ``WIDE_WEIGHTS`` (float16 operands): ``w`` can exceed float16's 65504 (the artanh slope
        reaches ``artanh_scale / 2 artanh_eps``, upstream gradients are scaled by loss scalers),
        so these run in tf32: float32's range, float16's 10-bit mantissa, on the tensor cores."""
        if WIDE_WEIGHTS:
            return tl.dot(w, y.to(tl.float32), input_precision="tf32")
        else:
            return _dot(w.to(y.dtype), y, DOT_PRECISION, UPCAST)

    @triton.jit
    def _dot(x, y, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``x @ y`` with fp32 (fp64) accumulation. ``UPCAST``: Triton's interpreter mis-multiplies
        bfloat16 blocks (it treats them as raw 16-bit integers), so there the already-rounded
        operands are widened first - the same numbers a bf16 tensor-core dot with fp32
        accumulation produces, since a product of two bf16 values is exact in fp32."""
        if UPCAST:
            return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(x, y, input_precision=DOT_PRECISION)

    @triton.jit
    def _forward_kernel(
        anchors_ptr, candidates_ptr, inv_temp_ptr, pos_index_ptr, self_index_ptr, lse_neg_ptr,
        E_ptr,
        M, K, D, stride_anchors, stride_candidates, stride_E,
        logit_params_ptr, anchor_labels_ptr, candidate_labels_ptr,
        LOGIT_MAP: tl.constexpr, HAS_SELF: tl.constexpr, ACC_E: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, WIDE_WEIGHTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of anchor rows against every candidate tile: ``lse_neg`` and, if ``ACC_E``,
        ``E_a = sum_k Q_ak w_ak u_k`` (``w = 1`` for SCALED, ``w = dl_dS`` for ARTANH)."""
        acc_ty = lse_neg_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
        # The map's float scalars in the compute dtype (a Python float would reach a compiled
        # kernel as fp32 and round 1 - artanh_eps for float64): [artanh_scale, artanh_eps].
        artanh_scale = tl.load(logit_params_ptr)
        artanh_eps = tl.load(logit_params_ptr + 1)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < M
        d_ok = offs_d < D
        anchors = tl.load(anchors_ptr + offs_m.to(tl.int64)[:, None] * stride_anchors
                          + offs_d[None, :],
                          mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # inv_temp_ptr is a valid dummy pointer for ARTANH (its values are then unused);
        # likewise self_index_ptr without HAS_SELF.
        inv_temp = tl.load(inv_temp_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
        pos_index = tl.load(pos_index_ptr + offs_m, mask=row_ok, other=-1)
        self_index = tl.load(self_index_ptr + offs_m, mask=row_ok, other=-1)
        if HAS_LABELS:  # the label pointers are dummies (pos_index) without HAS_LABELS
            label_a = tl.load(anchor_labels_ptr + offs_m, mask=row_ok, other=-1)

        m_i = tl.full([BLOCK_M], float("-inf"), acc_ty)  # running max of the row's logits
        s_i = tl.zeros([BLOCK_M], acc_ty)  # running sum of exp(l - m_i)
        e_i = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)  # running sum of exp(l - m_i) w u_k
        for n0 in range(0, K, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < K
            candidates = tl.load(
                candidates_ptr + offs_n.to(tl.int64)[:, None] * stride_candidates + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            S = _dot(anchors, tl.trans(candidates), DOT_PRECISION, UPCAST).to(acc_ty)
            # Neg(a): in range, not the positive, not self - excluded by index, as -inf.
            keep = col_ok[None, :] & (offs_n[None, :] != pos_index[:, None])
            if HAS_SELF:
                keep = keep & (offs_n[None, :] != self_index[:, None])
            if HAS_LABELS:  # same-label candidates are not negatives
                label_k = tl.load(candidate_labels_ptr + offs_n, mask=col_ok, other=-1)
                keep = keep & (label_k[None, :] != label_a[:, None])
            l = tl.where(keep, _logit(S, inv_temp[:, None], artanh_scale, artanh_eps, LOGIT_MAP),
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(l, axis=1))
            # A row with nothing kept yet has m_new = -inf: shift by 0 there, not by -inf
            # (-inf - -inf would be NaN); its exp terms are then exp(-inf) = 0.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp(m_i - m_ref)
            p = tl.exp(l - m_ref[:, None])
            s_i = s_i * rescale + tl.sum(p, axis=1)
            if ACC_E:
                if LOGIT_MAP == LOGIT_MAP_ARTANH:
                    p = p * _dl_dS(S, inv_temp[:, None], artanh_scale, artanh_eps, LOGIT_MAP)
                e_i = e_i * rescale[:, None] + _weights_dot(p, candidates, DOT_PRECISION, UPCAST,
                                                            WIDE_WEIGHTS).to(acc_ty)
            m_i = m_new
        has_neg = s_i > 0
        lse_neg = tl.where(has_neg, m_i + tl.log(tl.where(has_neg, s_i, 1.0)), float("-inf"))
        tl.store(lse_neg_ptr + offs_m, lse_neg, mask=row_ok)
        if ACC_E:
            e_i = e_i / tl.where(has_neg, s_i, 1.0)[:, None]  # sum exp(l - m) -> sum Q
            tl.store(E_ptr + offs_m.to(tl.int64)[:, None] * stride_E + offs_d[None, :], e_i,
                     mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _candidates_kernel(
        anchors_ptr, candidates_ptr, inv_temp_ptr, pos_index_ptr, self_index_ptr, lse_neg_ptr,
        g_ptr, d_candidates_ptr, d_inv_temp_ptr,
        M, K, D, stride_anchors, stride_candidates, stride_d_candidates,
        logit_params_ptr, anchor_labels_ptr, candidate_labels_ptr,
        LOGIT_MAP: tl.constexpr, HAS_SELF: tl.constexpr, SYMMETRIC: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        NEED_D_INV_TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        WIDE_WEIGHTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of candidates against every anchor block (column order: each program owns
        its output rows, so no atomics and a deterministic sum):
        ``d_candidates_k = sum_a dL_dS_ak u_a``. ``SYMMETRIC`` (the anchors are the
        candidates): candidate ``k`` is anchor ``k`` too, and the same recomputed tile also gives
        its row side ``dL_dS_ka`` (``S_ka = S_ak``), so the block accumulates the one tensor's
        whole gradient ``sum_a (dL_dS_ak + dL_dS_ka) u_a`` and ``d_inv_temp_k = g_k sum_a Q_ka
        S_ka``."""
        acc_ty = lse_neg_ptr.dtype.element_ty
        # [artanh_scale, artanh_eps] in the compute dtype, as in the forward.
        artanh_scale = tl.load(logit_params_ptr)
        artanh_eps = tl.load(logit_params_ptr + 1)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < K
        d_ok = offs_d < D
        candidates = tl.load(
            candidates_ptr + offs_n.to(tl.int64)[:, None] * stride_candidates + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        d_candidates = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
        d_inv_temp = tl.zeros([BLOCK_N], acc_ty)
        if HAS_LABELS:  # symmetric: the candidates' labels are the anchors'
            label_k = tl.load(candidate_labels_ptr + offs_n, mask=col_ok, other=-1)
        if SYMMETRIC:  # candidate k's own row statistics (K == M)
            inv_temp_k = tl.load(inv_temp_ptr + offs_n, mask=col_ok, other=0.0).to(acc_ty)
            pos_index_k = tl.load(pos_index_ptr + offs_n, mask=col_ok, other=-1)
            self_index_k = tl.load(self_index_ptr + offs_n, mask=col_ok, other=-1)
            lse_neg_k = tl.load(lse_neg_ptr + offs_n, mask=col_ok, other=0.0)
            g_k = tl.load(g_ptr + offs_n, mask=col_ok, other=0.0).to(acc_ty)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            anchors = tl.load(anchors_ptr + offs_m.to(tl.int64)[:, None] * stride_anchors
                          + offs_d[None, :],
                              mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            inv_temp_a = tl.load(inv_temp_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            pos_index_a = tl.load(pos_index_ptr + offs_m, mask=row_ok, other=-1)
            self_index_a = tl.load(self_index_ptr + offs_m, mask=row_ok, other=-1)
            lse_neg_a = tl.load(lse_neg_ptr + offs_m, mask=row_ok, other=0.0)
            g_a = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            # S^T: St[k, a] = S_ak.
            St = _dot(candidates, tl.trans(anchors), DOT_PRECISION, UPCAST).to(acc_ty)
            in_range = col_ok[:, None] & row_ok[None, :]
            # Column side: anchor a's Q_ak over its Neg(a).
            keep = in_range & (offs_n[:, None] != pos_index_a[None, :])
            if HAS_SELF:
                keep = keep & (offs_n[:, None] != self_index_a[None, :])
            if HAS_LABELS:
                label_a = tl.load(anchor_labels_ptr + offs_m, mask=row_ok, other=-1)
                keep = keep & (label_k[:, None] != label_a[None, :])
            l = tl.where(keep, _logit(St, inv_temp_a[None, :], artanh_scale, artanh_eps,
                                      LOGIT_MAP), float("-inf"))
            Q = tl.exp(l - lse_neg_a[None, :])
            dL_dS_t = (g_a[None, :] * Q) * _dl_dS(St, inv_temp_a[None, :], artanh_scale,
                                                  artanh_eps, LOGIT_MAP)
            if SYMMETRIC:
                # Row side: candidate k as an anchor, Q_ka over Neg(k), S_ka = S_ak.
                keep_k = in_range & (offs_m[None, :] != pos_index_k[:, None])
                if HAS_SELF:
                    keep_k = keep_k & (offs_m[None, :] != self_index_k[:, None])
                if HAS_LABELS:  # equal labels: the pair is symmetric
                    keep_k = keep_k & (label_k[:, None] != label_a[None, :])
                l_k = tl.where(keep_k, _logit(St, inv_temp_k[:, None], artanh_scale, artanh_eps,
                                              LOGIT_MAP), float("-inf"))
                dL_dl_k = g_k[:, None] * tl.exp(l_k - lse_neg_k[:, None])
                dL_dS_t += dL_dl_k * _dl_dS(St, inv_temp_k[:, None], artanh_scale, artanh_eps,
                                            LOGIT_MAP)
                if NEED_D_INV_TEMP:
                    d_inv_temp += tl.sum(dL_dl_k * St, axis=1)
            d_candidates += _weights_dot(dL_dS_t, anchors, DOT_PRECISION, UPCAST,
                                         WIDE_WEIGHTS).to(acc_ty)
        tl.store(d_candidates_ptr + offs_n.to(tl.int64)[:, None] * stride_d_candidates
                 + offs_d[None, :],
                 d_candidates, mask=col_ok[:, None] & d_ok[None, :])
        if SYMMETRIC and NEED_D_INV_TEMP:
            tl.store(d_inv_temp_ptr + offs_n, d_inv_temp, mask=col_ok)

    # ----------------------------------------------------------------------------------------
    # Both directions (layout cross_sym on one process, Problem.both_directions): the rows of S
    # are anchors against the candidates and its columns anchors against the rows. The per-anchor
    # arrays have M + K entries (rows, then columns); the kernels get the two halves as separate
    # pointers.
    # ----------------------------------------------------------------------------------------

    @triton.jit
    def _both_forward_kernel(
        anchors_ptr, candidates_ptr, inv_temp_ptr, pos_index_ptr, self_index_ptr,
        col_inv_temp_ptr, col_pos_index_ptr, col_self_index_ptr, lse_neg_ptr,
        col_max_ptr, col_sum_ptr,
        M, K, D, stride_anchors, stride_candidates,
        logit_params_ptr,
        LOGIT_MAP: tl.constexpr, HAS_SELF: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of anchor rows against every candidate tile, each tile of ``S`` computed
        once for both directions: the rows' ``lse_neg`` (online, as ``_forward_kernel``) and,
        per column, this block's partial ``(max, sum of exp(l - max))`` of the column's logits
        over these rows, stored at ``[program, column]`` of ``col_max`` / ``col_sum``
        (``[cdiv(M, BLOCK_M), K]``). A second, tiny pass merges the partials in block order: no
        atomics, deterministic."""
        acc_ty = lse_neg_ptr.dtype.element_ty
        # [artanh_scale, artanh_eps] in the compute dtype, as in _forward_kernel.
        artanh_scale = tl.load(logit_params_ptr)
        artanh_eps = tl.load(logit_params_ptr + 1)
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < M
        d_ok = offs_d < D
        anchors = tl.load(
            anchors_ptr + offs_m.to(tl.int64)[:, None] * stride_anchors + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        inv_temp = tl.load(inv_temp_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
        pos_index = tl.load(pos_index_ptr + offs_m, mask=row_ok, other=-1)
        self_index = tl.load(self_index_ptr + offs_m, mask=row_ok, other=-1)
        m_i = tl.full([BLOCK_M], float("-inf"), acc_ty)
        s_i = tl.zeros([BLOCK_M], acc_ty)
        partial_row = pid.to(tl.int64) * K
        for n0 in range(0, K, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < K
            candidates = tl.load(
                candidates_ptr + offs_n.to(tl.int64)[:, None] * stride_candidates
                + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            S = _dot(anchors, tl.trans(candidates), DOT_PRECISION, UPCAST).to(acc_ty)
            in_range = row_ok[:, None] & col_ok[None, :]
            # Rows: anchor a against candidate k, Neg(a) without pos_index[a] (and self).
            keep = in_range & (offs_n[None, :] != pos_index[:, None])
            if HAS_SELF:
                keep = keep & (offs_n[None, :] != self_index[:, None])
            l = tl.where(keep, _logit(S, inv_temp[:, None], artanh_scale, artanh_eps, LOGIT_MAP),
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(l, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(l - m_ref[:, None]), axis=1)
            m_i = m_new
            # Columns: candidate k as an anchor against row a, without its positive (and self)
            # among the rows.
            col_inv_temp = tl.load(col_inv_temp_ptr + offs_n, mask=col_ok, other=0.0).to(acc_ty)
            col_pos = tl.load(col_pos_index_ptr + offs_n, mask=col_ok, other=-1)
            keep_col = in_range & (offs_m[:, None] != col_pos[None, :])
            if HAS_SELF:
                col_self = tl.load(col_self_index_ptr + offs_n, mask=col_ok, other=-1)
                keep_col = keep_col & (offs_m[:, None] != col_self[None, :])
            l_col = tl.where(keep_col, _logit(S, col_inv_temp[None, :], artanh_scale, artanh_eps,
                                              LOGIT_MAP), float("-inf"))
            c_max = tl.max(l_col, axis=0)
            c_ref = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp(l_col - c_ref[None, :]), axis=0)
            tl.store(col_max_ptr + partial_row + offs_n, c_max, mask=col_ok)
            tl.store(col_sum_ptr + partial_row + offs_n, c_sum, mask=col_ok)
        has_neg = s_i > 0
        lse_neg = tl.where(has_neg, m_i + tl.log(tl.where(has_neg, s_i, 1.0)), float("-inf"))
        tl.store(lse_neg_ptr + offs_m, lse_neg, mask=row_ok)

    @triton.jit
    def _both_backward_kernel(
        anchors_ptr, candidates_ptr,
        inv_temp_ptr, pos_index_ptr, self_index_ptr, lse_neg_ptr, g_ptr,
        own_inv_temp_ptr, own_pos_index_ptr, own_self_index_ptr, own_lse_neg_ptr, own_g_ptr,
        d_candidates_ptr, d_inv_temp_ptr,
        M, K, D, stride_anchors, stride_candidates, stride_d_candidates,
        logit_params_ptr,
        LOGIT_MAP: tl.constexpr, HAS_SELF: tl.constexpr, NEED_D_INV_TEMP: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, WIDE_WEIGHTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One side's gradient in both directions, ``_candidates_kernel``'s column order: each
        program owns a block of the "candidates" (here: the side whose gradient it writes, with
        its own statistics ``own_*``) and streams the "anchors" (the other side, statistics
        without prefix). From one recompute of each tile it forms both directions' ``dL_dS``
        (the streamed rows as anchors, ``Q`` from ``lse_neg``; its own rows as anchors, ``Q``
        from ``own_lse_neg``) and accumulates ``d_candidates = sum_a dL_dS_ak u_a`` and the own
        rows' ``d_inv_temp``. Launched once per side (for the anchors' gradient the two sides
        swap roles): two passes, 2 GEMMs each."""
        acc_ty = lse_neg_ptr.dtype.element_ty
        artanh_scale = tl.load(logit_params_ptr)
        artanh_eps = tl.load(logit_params_ptr + 1)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < K
        d_ok = offs_d < D
        candidates = tl.load(
            candidates_ptr + offs_n.to(tl.int64)[:, None] * stride_candidates + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        d_candidates = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
        d_inv_temp = tl.zeros([BLOCK_N], acc_ty)
        inv_temp_k = tl.load(own_inv_temp_ptr + offs_n, mask=col_ok, other=0.0).to(acc_ty)
        pos_index_k = tl.load(own_pos_index_ptr + offs_n, mask=col_ok, other=-1)
        self_index_k = tl.load(own_self_index_ptr + offs_n, mask=col_ok, other=-1)
        lse_neg_k = tl.load(own_lse_neg_ptr + offs_n, mask=col_ok, other=0.0)
        g_k = tl.load(own_g_ptr + offs_n, mask=col_ok, other=0.0).to(acc_ty)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            anchors = tl.load(
                anchors_ptr + offs_m.to(tl.int64)[:, None] * stride_anchors + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            inv_temp_a = tl.load(inv_temp_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            pos_index_a = tl.load(pos_index_ptr + offs_m, mask=row_ok, other=-1)
            self_index_a = tl.load(self_index_ptr + offs_m, mask=row_ok, other=-1)
            lse_neg_a = tl.load(lse_neg_ptr + offs_m, mask=row_ok, other=0.0)
            g_a = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            St = _dot(candidates, tl.trans(anchors), DOT_PRECISION, UPCAST).to(acc_ty)
            in_range = col_ok[:, None] & row_ok[None, :]
            # The streamed rows as anchors: Q_ak over Neg(a).
            keep = in_range & (offs_n[:, None] != pos_index_a[None, :])
            if HAS_SELF:
                keep = keep & (offs_n[:, None] != self_index_a[None, :])
            l = tl.where(keep, _logit(St, inv_temp_a[None, :], artanh_scale, artanh_eps,
                                      LOGIT_MAP), float("-inf"))
            dL_dS_t = (g_a[None, :] * tl.exp(l - lse_neg_a[None, :])) * _dl_dS(
                St, inv_temp_a[None, :], artanh_scale, artanh_eps, LOGIT_MAP)
            # The own rows as anchors: Q_ka over Neg(k).
            keep_k = in_range & (offs_m[None, :] != pos_index_k[:, None])
            if HAS_SELF:
                keep_k = keep_k & (offs_m[None, :] != self_index_k[:, None])
            l_k = tl.where(keep_k, _logit(St, inv_temp_k[:, None], artanh_scale, artanh_eps,
                                          LOGIT_MAP), float("-inf"))
            dL_dl_k = g_k[:, None] * tl.exp(l_k - lse_neg_k[:, None])
            dL_dS_t += dL_dl_k * _dl_dS(St, inv_temp_k[:, None], artanh_scale, artanh_eps,
                                        LOGIT_MAP)
            if NEED_D_INV_TEMP:
                d_inv_temp += tl.sum(dL_dl_k * St, axis=1)
            d_candidates += _weights_dot(dL_dS_t, anchors, DOT_PRECISION, UPCAST,
                                         WIDE_WEIGHTS).to(acc_ty)
        tl.store(d_candidates_ptr + offs_n.to(tl.int64)[:, None] * stride_d_candidates
                 + offs_d[None, :], d_candidates, mask=col_ok[:, None] & d_ok[None, :])
        if NEED_D_INV_TEMP:
            tl.store(d_inv_temp_ptr + offs_n, d_inv_temp, mask=col_ok)

    # ----------------------------------------------------------------------------------------
    # RowReduction.SOFTPLUS (SigLIP): sibling kernels of the two above, sharing their helpers.
    # ----------------------------------------------------------------------------------------

    @triton.jit
    def _softplus(x):
        """``softplus(x) = max(x, 0) + log1p(e^-|x|)`` at any ``x`` (0 at ``x = -inf``, an
        excluded pair). ``log1p(e)`` without a ``log1p``: ``log(u) * e / (u - 1)``, ``u = 1 + e``,
        exact to rounding (Goldberg), and ``e`` itself where ``u`` rounds to 1."""
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        return tl.where(x > 0.0, x, 0.0) + log1p_e

    @triton.jit
    def _sigmoid(x):
        """``sigmoid(x)`` from ``e = e^-|x| <= 1``: no overflow at any ``x``; 0 at ``x = -inf``."""
        e = tl.exp(-tl.abs(x))
        r = 1.0 / (1.0 + e)
        return tl.where(x >= 0.0, r, e * r)

    @triton.jit
    def _softplus_forward_kernel(
        anchors_ptr, candidates_ptr, inv_temp_ptr, row_bias_ptr, pos_index_ptr, self_index_ptr,
        sp_neg_ptr, E_ptr,
        M, K, D, stride_anchors, stride_candidates, stride_E,
        HAS_BIAS: tl.constexpr, HAS_SELF: tl.constexpr, ACC_E: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of anchor rows against every candidate tile: ``sp_neg[a] = sum_{k in
        Neg(a)} softplus(l_ak)``, ``l_ak = inv_temp[a] S_ak + row_bias[a]``, and, if ``ACC_E``,
        ``E[a, :D] = sum_k sigmoid(l_ak) u_k`` and ``E[a, D] = sum_k sigmoid(l_ak)``."""
        acc_ty = sp_neg_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < M
        d_ok = offs_d < D
        rows = offs_m.to(tl.int64)
        anchors = tl.load(anchors_ptr + rows[:, None] * stride_anchors + offs_d[None, :],
                          mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        inv_temp = tl.load(inv_temp_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
        bias = tl.zeros([BLOCK_M], acc_ty)
        if HAS_BIAS:
            bias = tl.load(row_bias_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
        pos_index = tl.load(pos_index_ptr + offs_m, mask=row_ok, other=-1)
        self_index = tl.load(self_index_ptr + offs_m, mask=row_ok, other=-1)

        s_i = tl.zeros([BLOCK_M], acc_ty)  # sum of softplus(l) over Neg(a)
        sig_i = tl.zeros([BLOCK_M], acc_ty)  # sum of sigmoid(l)
        e_i = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)  # sum of sigmoid(l) u_k
        for n0 in range(0, K, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < K
            candidates = tl.load(
                candidates_ptr + offs_n.to(tl.int64)[:, None] * stride_candidates
                + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            S = _dot(anchors, tl.trans(candidates), DOT_PRECISION, UPCAST).to(acc_ty)
            keep = col_ok[None, :] & (offs_n[None, :] != pos_index[:, None])
            if HAS_SELF:
                keep = keep & (offs_n[None, :] != self_index[:, None])
            l = tl.where(keep, inv_temp[:, None] * S + bias[:, None], float("-inf"))
            s_i += tl.sum(_softplus(l), axis=1)
            if ACC_E:
                sig = _sigmoid(l)  # <= 1: float16 operands hold it
                sig_i += tl.sum(sig, axis=1)
                e_i += _weights_dot(sig, candidates, DOT_PRECISION, UPCAST, False).to(acc_ty)
        tl.store(sp_neg_ptr + offs_m, s_i, mask=row_ok)
        if ACC_E:
            tl.store(E_ptr + rows[:, None] * stride_E + offs_d[None, :], e_i,
                     mask=row_ok[:, None] & d_ok[None, :])
            tl.store(E_ptr + rows * stride_E + D, sig_i, mask=row_ok)

    @triton.jit
    def _softplus_candidates_kernel(
        anchors_ptr, candidates_ptr, inv_temp_ptr, row_bias_ptr, pos_index_ptr, self_index_ptr,
        g_ptr, d_candidates_ptr,
        M, K, D, stride_anchors, stride_candidates, stride_d_candidates,
        HAS_BIAS: tl.constexpr, HAS_SELF: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, WIDE_WEIGHTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of candidates against every anchor block (column order, no atomics):
        ``d_candidates_k = sum_a g_a inv_temp[a] sigmoid(l_ak) u_a`` over ``a`` with ``k`` in
        ``Neg(a)``."""
        acc_ty = d_candidates_ptr.dtype.element_ty
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < K
        d_ok = offs_d < D
        cols = offs_n.to(tl.int64)
        candidates = tl.load(candidates_ptr + cols[:, None] * stride_candidates + offs_d[None, :],
                             mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        d_candidates = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            anchors = tl.load(
                anchors_ptr + offs_m.to(tl.int64)[:, None] * stride_anchors + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            inv_temp_a = tl.load(inv_temp_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            bias_a = tl.zeros([BLOCK_M], acc_ty)
            if HAS_BIAS:
                bias_a = tl.load(row_bias_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            pos_index_a = tl.load(pos_index_ptr + offs_m, mask=row_ok, other=-1)
            self_index_a = tl.load(self_index_ptr + offs_m, mask=row_ok, other=-1)
            g_a = tl.load(g_ptr + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            St = _dot(candidates, tl.trans(anchors), DOT_PRECISION, UPCAST).to(acc_ty)
            keep = (col_ok[:, None] & row_ok[None, :]
                    & (offs_n[:, None] != pos_index_a[None, :]))
            if HAS_SELF:
                keep = keep & (offs_n[:, None] != self_index_a[None, :])
            l = tl.where(keep, inv_temp_a[None, :] * St + bias_a[None, :], float("-inf"))
            dL_dS_t = (g_a * inv_temp_a)[None, :] * _sigmoid(l)
            d_candidates += _weights_dot(dL_dS_t, anchors, DOT_PRECISION, UPCAST,
                                         WIDE_WEIGHTS).to(acc_ty)
        tl.store(d_candidates_ptr + cols[:, None] * stride_d_candidates + offs_d[None, :],
                 d_candidates, mask=col_ok[:, None] & d_ok[None, :])

# --------------------------------------------------------------------------------------------
# Precision classes, the kernel table and the GPU shape rules
# --------------------------------------------------------------------------------------------

# How a problem's operands reach ``tl.dot``: (operand dtype, accumulator dtype, DOT_PRECISION).
# float32 at torch's default matmul precision ("highest") runs 3xTF32 (each operand split into a
# tf32 high part and a tf32 remainder, three tensor-core products, float32 accumulation: close to
# float32's own rounding, see the README's GPU section). An "ieee" float32 dot is lowered to FMAs
# that hold whole operand tiles in registers and spills 7-17 KB per thread on sm_90 at every
# tile shape that is worth running (bench/results/gpu_readiness/).
PRECISIONS = {
    "fp32": (torch.float32, torch.float32, "tf32x3"),
    "fp32-tf32": (torch.float32, torch.float32, "tf32"),  # matmul precision "high"/"medium"
    "bf16": (torch.bfloat16, torch.float32, "ieee"),  # DOT_PRECISION is moot for half operands
    "fp16": (torch.float16, torch.float32, "ieee"),
    "fp64": (torch.float64, torch.float64, "ieee"),
}


def _precision_of(op_dtype: torch.dtype, dot_precision: str) -> str:
    if op_dtype == torch.float32:
        return "fp32" if dot_precision == "tf32x3" else "fp32-tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[op_dtype]


def precision_class(op_dtype: torch.dtype) -> str:
    """The ``PRECISIONS`` name of operands of ``op_dtype`` under the current float32 matmul
    precision."""
    if op_dtype == torch.float32:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "fp32-tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[op_dtype]


def block_d_of(d: int) -> int:
    """The tile width holding a whole row of width ``d``: a power of two, at least 16."""
    return max(16, 1 << (max(int(d), 1) - 1).bit_length())


# Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages) per precision class, kernel kind and
# width, with the shared memory (bytes) the compiled kernel uses at the width's largest BLOCK_D
# (the most over flag sets and Triton 3.6 / 3.9): ``(largest BLOCK_D, ((shape, shared), ...))``
# in increasing width. The first shape of a list is the default (AUTOTUNE off), all of them the
# autotuner's candidates. Measured, not modelled (``macl-kernels kernels --arch sm_90``,
# bench/results/gpu_readiness/): every shape listed compiles, under Triton 3.6 and 3.9, with at
# most 1 KB of spill per thread, within an H100/H200's 232,448 B of shared memory per block and
# within its shared figure here (tests/test_kernel_inventory.py checks both on the compiled
# kernels). Beyond a list's last width there is no such shape: the backend refuses the width
# (``auto`` passes over it). Kind "forward": BLOCK_M rows resident, BLOCK_N streamed;
# "candidates": BLOCK_N resident, BLOCK_M streamed. Every kernel of a kind shares its table (the
# both-directions and softplus kernels were measured within it at each precision's widest
# default shape; the label mask's int64 loads add up to 512 B of shared memory, measured at the
# defaults only: bench/results/gpu_readiness/README.md, "After the merge").
_SHAPES = {
    ("fp32", "forward"): (
        (64, (((64, 32, 4, 2), 57344), ((32, 32, 4, 2), 24576))),
        (128, (((32, 32, 8, 2), 49408), ((32, 32, 4, 2), 49152), ((64, 32, 8, 2), 114688)))),
    ("fp32", "candidates"): (
        (64, (((64, 32, 4, 2), 33792), ((32, 32, 4, 2), 25088))),
        (128, (((64, 32, 8, 2), 67328), ((32, 32, 4, 2), 49792), ((32, 32, 8, 2), 49792)))),
    ("fp32-tf32", "forward"): (
        (128, (((64, 32, 4, 2), 65536), ((64, 64, 4, 2), 98304), ((64, 64, 8, 2), 98304))),
        (256, (((32, 32, 4, 2), 98304), ((64, 32, 8, 2), 131072), ((64, 64, 8, 2), 196608))),
        (512, (((32, 32, 8, 1), 196608),)),
        (1024, (((16, 16, 4, 1), 163840),))),
    ("fp32-tf32", "candidates"): (
        (128, (((64, 32, 4, 2), 66560), ((64, 64, 4, 2), 99328), ((64, 64, 8, 2), 99328))),
        (256, (((64, 32, 8, 2), 165120), ((32, 32, 4, 2), 98816), ((64, 64, 8, 2), 197632))),
        (512, (((32, 32, 8, 1), 196608),)),
        (1024, (((16, 16, 4, 1), 163840),))),
    ("bf16", "forward"): (
        (128, (((64, 64, 4, 2), 49152), ((128, 64, 8, 2), 65536), ((64, 64, 4, 3), 49152),
               ((64, 128, 8, 2), 81920))),
        (256, (((64, 32, 4, 2), 65536), ((64, 64, 8, 2), 98304), ((64, 64, 4, 2), 98304),
               ((128, 64, 8, 2), 131072))),
        (512, (((32, 32, 8, 1), 98304), ((64, 32, 8, 2), 131072), ((32, 32, 4, 2), 98304))),
        (1024, (((16, 32, 8, 1), 163840), ((32, 32, 8, 1), 196608)))),
    ("bf16", "candidates"): (
        (128, (((64, 64, 4, 2), 50176), ((64, 128, 8, 2), 66560), ((64, 64, 4, 3), 51200),
               ((64, 64, 8, 2), 50176))),
        (256, (((64, 32, 4, 2), 66816), ((64, 64, 8, 2), 99328))),
        (512, (((64, 32, 8, 2), 164864), ((32, 32, 4, 2), 98816), ((32, 32, 8, 1), 98304))),
        (1024, (((32, 16, 8, 1), 163840), ((32, 32, 8, 1), 196608)))),
    ("fp64", "forward"): (
        (128, (((32, 32, 8, 1), 98304), ((16, 32, 4, 1), 81920))),
        (256, (((32, 32, 8, 1), 196608), ((16, 16, 4, 1), 98304))),
        (512, (((16, 16, 8, 1), 196608),))),
    ("fp64", "candidates"): (
        (128, (((32, 32, 8, 1), 98304), ((16, 32, 4, 1), 65536))),
        (256, (((32, 32, 8, 1), 196608), ((16, 16, 4, 1), 98304))),
        (512, (((16, 16, 8, 1), 196608),))),
}
# float16 takes bfloat16's shapes (its tf32 weight GEMMs measured within them).
_SHAPES[("fp16", "forward")] = _SHAPES[("bf16", "forward")]
_SHAPES[("fp16", "candidates")] = _SHAPES[("bf16", "candidates")]

# Shared memory per block by compute capability (the opt-in maximum; Triton's limit too).
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448,
                       100: 232_448, 120: 101_376}
H100_SHARED_MEMORY = SHARED_MEMORY_LIMIT[90]


def measured_shared_memory(shape, block_d: int, precision: str, kind: str) -> Optional[int]:
    """The shared memory the table records for ``shape`` at ``block_d``'s width (an upper
    bound for every BLOCK_D of that width), or ``None`` when the shape is not listed there."""
    for largest, entries in _SHAPES[(precision, kind)]:
        if block_d <= largest:
            return dict(entries).get(tuple(shape))
    return None


def shape_candidates(kind: str, precision: str, block_d: int,
                     shared_limit: int = H100_SHARED_MEMORY) -> list:
    """The measured shapes for this kernel kind, precision and width whose recorded shared
    memory fits ``shared_limit``, default first; empty when there is none (the width is
    refused)."""
    for largest, entries in _SHAPES[(precision, kind)]:
        if block_d <= largest:
            return [shape for shape, shared in entries if shared <= shared_limit]
    return []


def max_block_d(precision: str, shared_limit: int = H100_SHARED_MEMORY) -> int:
    """The widest ``BLOCK_D`` every kernel kind has a fitting shape for (0: none)."""
    widths = [bd for bd in (16, 32, 64, 128, 256, 512, 1024)
              if all(shape_candidates(kind, precision, bd, shared_limit)
                     for kind in ("forward", "candidates"))]
    return max(widths, default=0)


def device_shared_limit(device: Optional[torch.device] = None) -> int:
    """Shared memory per block on CUDA ``device``: torch's opt-in figure where it has one, else
    by compute capability; an H100's for ``None`` or a device that is not a visible GPU."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return H100_SHARED_MEMORY
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    return SHARED_MEMORY_LIMIT.get(props.major * 10 + props.minor, 101_376)


class KernelSpec(NamedTuple):
    """One Triton kernel as the launcher, the shape rules and the inventory see it. Register a
    new kernel in ``KERNELS`` (``register_kernel``) so that ``macl-kernels kernels`` compiles and
    checks it with the others."""

    function: object  # the @triton.jit function
    kind: str  # "forward" (BLOCK_M rows resident) or "candidates" (BLOCK_N rows resident)
    tune_key: tuple  # the autotuner's key (besides BLOCK_D)
    # precision name -> the constexpr flag sets the inventory compiles: ((label, flags), ...)
    inventory_flags: object
    operand_args: tuple = ("anchors_ptr", "candidates_ptr")  # pointers of the operand dtype
    index_args: tuple = ("pos_index_ptr", "self_index_ptr")  # int32 pointers
    label_args: tuple = ()  # int64 pointers (labels are arbitrary integers, never narrowed)
    # False: launched with one fixed shape of the table, chosen before the launch (a buffer is
    # sized by it), never through the autotuner.
    autotuned: bool = True

    @property
    def grid_block(self) -> str:
        return "BLOCK_M" if self.kind == "forward" else "BLOCK_N"


def _scaled_or_artanh(artanh: bool) -> int:
    return int(LogitMap.ARTANH if artanh else LogitMap.SCALED)


def _forward_flag_sets(precision: str):
    """Every flag combination the forward is launched with (HAS_SELF on: the larger kernel).
    The label mask comes with the SCALED map (the losses that take labels scale by a
    temperature) and adds two loads and a compare per tile."""
    return tuple((f"{'artanh' if artanh else 'scaled'}{' +E' if acc_e else ''}"
                  f"{' labels' if labels else ''}",
                  dict(LOGIT_MAP=_scaled_or_artanh(artanh), ACC_E=acc_e, HAS_LABELS=labels,
                       WIDE_WEIGHTS=precision == "fp16" and artanh))
                 for artanh in (False, True) for acc_e in (True, False)
                 for labels in ((False, True) if not artanh else (False,)))


def _candidates_flag_sets(precision: str):
    return tuple((f"{'artanh' if artanh else 'scaled'} {'sym' if sym else 'cross'}"
                  f"{' labels' if labels else ''}",
                  dict(LOGIT_MAP=_scaled_or_artanh(artanh), SYMMETRIC=sym,
                       NEED_D_INV_TEMP=sym and not artanh, HAS_LABELS=labels,
                       WIDE_WEIGHTS=precision == "fp16"))
                 for artanh in (False, True) for sym in (False, True)
                 for labels in ((False, True) if not artanh else (False,)))


def _both_forward_flag_sets(precision: str):
    return tuple(("artanh" if artanh else "scaled", dict(LOGIT_MAP=_scaled_or_artanh(artanh)))
                 for artanh in (False, True))


def _both_backward_flag_sets(precision: str):
    return tuple(("artanh" if artanh else "scaled",
                  dict(LOGIT_MAP=_scaled_or_artanh(artanh), NEED_D_INV_TEMP=not artanh,
                       WIDE_WEIGHTS=precision == "fp16"))
                 for artanh in (False, True))


def _softplus_forward_flag_sets(precision: str):
    return tuple((f"{'bias' if bias else 'no bias'}{' +E' if acc_e else ''}",
                  dict(HAS_BIAS=bias, ACC_E=acc_e))
                 for bias in (True, False) for acc_e in (True, False))


def _softplus_candidates_flag_sets(precision: str):
    return tuple(("bias" if bias else "no bias",
                  dict(HAS_BIAS=bias, WIDE_WEIGHTS=precision == "fp16"))
                 for bias in (True, False))


KERNELS: dict = {}
_TUNED: dict = {}


def register_kernel(name: str, spec: KernelSpec) -> None:
    """Add a kernel to the table the launcher (``_launch``) and the inventory read."""
    KERNELS[name] = spec
    _TUNED.pop(name, None)


if triton is not None:
    _LABELS = ("anchor_labels_ptr", "candidate_labels_ptr")
    _INDEX = ("pos_index_ptr", "self_index_ptr")
    register_kernel("forward", KernelSpec(
        _forward_kernel, "forward",
        ("LOGIT_MAP", "HAS_SELF", "ACC_E", "HAS_LABELS", "DOT_PRECISION", "WIDE_WEIGHTS"),
        _forward_flag_sets, label_args=_LABELS))
    register_kernel("candidates", KernelSpec(
        _candidates_kernel, "candidates",
        ("LOGIT_MAP", "HAS_SELF", "SYMMETRIC", "NEED_D_INV_TEMP", "HAS_LABELS", "DOT_PRECISION",
         "WIDE_WEIGHTS"), _candidates_flag_sets, label_args=_LABELS))
    # Both directions (layout cross_sym): the forward's columns' partials have one row per
    # program, so its BLOCK_M is fixed before the launch: the table's default shape, no tuning.
    register_kernel("both_forward", KernelSpec(
        _both_forward_kernel, "forward", ("LOGIT_MAP", "HAS_SELF", "DOT_PRECISION"),
        _both_forward_flag_sets,
        index_args=_INDEX + ("col_pos_index_ptr", "col_self_index_ptr"), autotuned=False))
    register_kernel("both_backward", KernelSpec(
        _both_backward_kernel, "candidates",
        ("LOGIT_MAP", "HAS_SELF", "NEED_D_INV_TEMP", "DOT_PRECISION", "WIDE_WEIGHTS"),
        _both_backward_flag_sets,
        index_args=_INDEX + ("own_pos_index_ptr", "own_self_index_ptr")))
    # RowReduction.SOFTPLUS (SigLIP).
    register_kernel("softplus_forward", KernelSpec(
        _softplus_forward_kernel, "forward", ("HAS_BIAS", "HAS_SELF", "ACC_E", "DOT_PRECISION"),
        _softplus_forward_flag_sets))
    register_kernel("softplus_candidates", KernelSpec(
        _softplus_candidates_kernel, "candidates",
        ("HAS_BIAS", "HAS_SELF", "DOT_PRECISION", "WIDE_WEIGHTS"),
        _softplus_candidates_flag_sets))


def _config(shape):
    bm, bn, warps, stages = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _tuned(name: str):
    """The autotuned wrapper of kernel ``name``: its space is every shape of its kind, pruned per
    call to the measured list for the call's precision and width (``shape_candidates``). Each
    kernel writes its outputs without reading them, so benchmarking configs on the real buffers
    is harmless (no reset_to_zero needed)."""
    if name not in _TUNED:
        spec = KERNELS[name]
        space = sorted({shape for (_, kind), widths in _SHAPES.items() if kind == spec.kind
                        for _, entries in widths for shape, _ in entries})

        def prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            operands = args[spec.operand_args[0]]
            precision = _precision_of(operands.dtype, args["DOT_PRECISION"])
            keep = set(shape_candidates(spec.kind, precision, args["BLOCK_D"],
                                        device_shared_limit(operands.device)))
            return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                           c.num_warps, c.num_stages) in keep]

        _TUNED[name] = triton.autotune(
            configs=[_config(s) for s in space], prune_configs_by={"early_config_prune": prune},
            key=["BLOCK_D", *spec.tune_key])(spec.function)
    return _TUNED[name]


class NoFittingShape(ValueError):
    """No measured tile shape fits this precision and width (or this GPU's shared memory)."""


class TritonResourceError(RuntimeError):
    """A compiled kernel did not fit the GPU at launch (Triton's ``OutOfResources``)."""


def _refusal(precision: str, d: int, shared_limit: int) -> str:
    widest = max_block_d(precision, shared_limit)
    hint = {"fp32": "; float32 at torch.set_float32_matmul_precision('high') (tf32) runs up to "
                    f"D = {max_block_d('fp32-tf32', shared_limit)}",
            "fp64": "; float64 is for checking, not training",
            }.get(precision, "")
    return (f"the triton backend has no tile shape for {precision} operands at D = {d} that "
            f"compiles without register spills within {shared_limit} B of shared memory (it "
            f"supports D <= {widest} there{hint}); use backend='cuda' or 'torch', or 'auto'")


def launch_shape(name: str, precision: str, block_d: int, device: torch.device):
    """The shape kernel ``name`` runs with when it is not autotuned (``AUTOTUNE`` off, or a
    kernel registered with ``autotuned=False``): the interpreter's blocks, else the table's
    default for the precision, width and device (``NoFittingShape`` when there is none)."""
    if _INTERPRET:
        return (INTERPRETER_BLOCK_M, INTERPRETER_BLOCK_N, 4, 1)
    limit = device_shared_limit(device)
    shapes = shape_candidates(KERNELS[name].kind, precision, block_d, limit)
    if not shapes:
        raise NoFittingShape(_refusal(precision, block_d, limit))
    return shapes[0]


def _launch(name: str, grid_rows: int, args, precision: str, shape=None, **flags):
    """Launch kernel ``name`` of ``KERNELS`` over ``grid_rows`` rows: under the interpreter with
    the fixed small blocks; on a GPU (on the tensors' device: Triton launches on the current one)
    through the autotuner, or with the default shape when ``AUTOTUNE`` is off. ``shape``: exactly
    this shape (a kernel whose buffers were sized by it, ``launch_shape``), no fallback."""
    spec = KERNELS[name]
    if _INTERPRET:
        blocks = dict(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=INTERPRETER_BLOCK_N)
        if shape is not None:
            blocks = dict(BLOCK_M=shape[0], BLOCK_N=shape[1])
        spec.function[(triton.cdiv(grid_rows, blocks[spec.grid_block]),)](
            *args, **flags, **blocks)
        return
    device = args[0].device
    limit = device_shared_limit(device)
    shapes = shape_candidates(spec.kind, precision, flags["BLOCK_D"], limit)
    if not shapes:
        raise NoFittingShape(_refusal(precision, args[0].shape[-1], limit))
    if shape is not None:
        shapes = [tuple(shape)]
    try:
        with torch.cuda.device(device):
            # The autotuner drops candidates that raise OutOfResources itself.
            if AUTOTUNE and spec.autotuned and shape is None:
                _tuned(name)[lambda meta: (triton.cdiv(grid_rows, meta[spec.grid_block]),)](
                    *args, **flags)
            else:
                # The default shape, else the next one of the list: the recorded shared memory
                # is sm_90's, another architecture may need more (nothing is written before a
                # kernel that does not fit raises).
                for i, (bm, bn, warps, stages) in enumerate(shapes):
                    blocks = dict(BLOCK_M=bm, BLOCK_N=bn)
                    try:
                        spec.function[(triton.cdiv(grid_rows, blocks[spec.grid_block]),)](
                            *args, **flags, **blocks, num_warps=warps, num_stages=stages)
                        break
                    except _OUT_OF_RESOURCES:
                        if i == len(shapes) - 1:
                            raise
    except _OUT_OF_RESOURCES as exc:
        raise TritonResourceError(
            f"the triton {name} kernel ran out of GPU resources for {precision} operands at "
            f"D = {args[0].shape[-1]} (BLOCK_D = {flags['BLOCK_D']}, shapes tried: {shapes}, "
            f"{limit} B of shared memory on {torch.cuda.get_device_name(device)}): {exc}. "
            f"Please report it with `macl-kernels info`; use backend='cuda' or 'torch' "
            f"meanwhile") from exc


def _out_of_resources():
    try:
        from triton.runtime.errors import OutOfResources
        return OutOfResources
    except ImportError:  # pragma: no cover - every Triton 3.x has it
        return RuntimeError


_OUT_OF_RESOURCES = _out_of_resources() if triton is not None else RuntimeError


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
    symmetric: bool  # the symmetric backward runs (a symmetric problem and USE_SYMMETRY)


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
                     candidate_labels, p.self_index is not None, USE_SYMMETRY and p.symmetric)


def _flags(problem: Problem, ops: _Operands) -> dict:
    """The constexpr flags every launch shares."""
    op_dtype = ops.anchors.dtype
    return dict(LOGIT_MAP=int(problem.logit_map), HAS_SELF=ops.has_self,
                HAS_LABELS=problem.has_labels,
                DOT_PRECISION=PRECISIONS[precision_class(op_dtype)][2],
                UPCAST=_INTERPRET and op_dtype == torch.bfloat16,
                BLOCK_D=block_d_of(problem.D))


_OPERAND_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _operand_dtype(problem: Problem) -> torch.dtype:
    """The dtype the dots read: the half ``operand_dtype`` of upcast half inputs, else the
    inputs'."""
    if problem.anchors.dtype == torch.float32 and problem.operand_dtype in (torch.float16,
                                                                          torch.bfloat16):
        return problem.operand_dtype
    return problem.anchors.dtype


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
    _launch(
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
    """Symmetric (``USE_SYMMETRY``): one column-ordered pass gives the one tensor's whole
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
        _launch(
            "candidates", K,
            (ops.anchors, ops.candidates, ops.inv_temp, ops.pos_index, ops.self_index, lse_neg,
             g, d_rows, d_inv_temp_out, M, K, D, ops.anchors.stride(0),
             ops.candidates.stride(0), d_rows.stride(0), _logit_params(problem),
             ops.anchor_labels, ops.candidate_labels),
            precision_class(ops.anchors.dtype),
            SYMMETRIC=ops.symmetric, NEED_D_INV_TEMP=need_symmetric_d_inv_temp,
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
    _launch(
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
        _launch(
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
    blocks = triton.cdiv(M, shape[0])
    lse_neg = problem.anchors.new_empty(M + K)
    # Extra memory: the columns' partial max and sum, 2 x cdiv(M, BLOCK_M) x K values.
    col_max = problem.anchors.new_empty((blocks, K))
    col_sum = problem.anchors.new_empty((blocks, K))
    _launch(
        "both_forward", M,
        (ops.anchors, ops.candidates, ops.inv_temp, ops.pos_index, ops.self_index,
         ops.inv_temp[M:], ops.pos_index[M:], ops.self_index[M:], lse_neg, col_max, col_sum,
         M, K, D, ops.anchors.stride(0), ops.candidates.stride(0), _logit_params(problem)),
        precision, shape=shape, **flags)
    # The merge (the "second tiny pass"): per column, the max over blocks and the sum of each
    # block's partial sum rescaled to it; a fixed order of reduction, no atomics.
    top = col_max.amax(dim=0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    total = (col_sum * torch.exp(col_max - shift)).sum(dim=0)
    lse_neg[M:] = torch.where(total > 0, shift + torch.log(total), float("-inf"))
    return lse_neg


def _run_both_backward(problem: Problem, lse_neg, g, needs: Needs) -> Grads:
    """Both directions' gradients: one column-ordered pass per side that needs one (the
    anchors' side: the anchors as the kernel's owned rows, the candidates streamed)."""
    ops = _operands(problem)
    M, K, D = problem.M, problem.K, problem.D
    g = g.to(problem.anchors.dtype).contiguous()
    need_d_inv_temp = needs.d_inv_temp and problem.logit_map is LogitMap.SCALED
    d_inv_temp = problem.anchors.new_empty(M + K) if need_d_inv_temp else None
    rows = slice(0, M)
    cols = slice(M, M + K)
    out = {}
    # (owned side, its rows, its entries; the streamed side, its rows, its entries)
    for name, own, own_part, other, other_part, wanted in (
            ("d_anchors", ops.anchors, rows, ops.candidates, cols, needs.d_anchors),
            ("d_candidates", ops.candidates, cols, ops.anchors, rows, needs.d_candidates)):
        if not (wanted or need_d_inv_temp):
            continue
        n_own, n_other = own.shape[0], other.shape[0]
        d_own = problem.anchors.new_empty((n_own, D))
        d_inv_temp_own = d_inv_temp[own_part] if need_d_inv_temp else lse_neg
        _launch(
            "both_backward", n_own,
            (other, own,
             ops.inv_temp[other_part], ops.pos_index[other_part], ops.self_index[other_part],
             lse_neg[other_part], g[other_part],
             ops.inv_temp[own_part], ops.pos_index[own_part], ops.self_index[own_part],
             lse_neg[own_part], g[own_part],
             d_own, d_inv_temp_own, n_other, n_own, D, other.stride(0), own.stride(0),
             d_own.stride(0), _logit_params(problem)),
            precision_class(ops.anchors.dtype),
            NEED_D_INV_TEMP=need_d_inv_temp,
            WIDE_WEIGHTS=ops.anchors.dtype == torch.float16,
            **_both_flags(problem, ops),
        )
        out[name] = d_own if wanted else None
    return Grads(out.get("d_anchors"), out.get("d_candidates"), d_inv_temp)


def _accumulates_e(problem: Problem, need_grad: bool) -> bool:
    # E serves the anchor side (and d_inv_temp) of a non-symmetric pass; the symmetric backward
    # gets everything from its one pass.
    return need_grad and not (USE_SYMMETRY and problem.symmetric)


class TritonBackend(Backend):
    """Triton kernels: on a GPU, or in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""

    name = "triton"
    max_d = MAX_D
    both_directions = True

    def unavailable_reason(self, device):
        return unavailable_reason(device)

    def check(self, problem: Problem) -> None:
        if _IMPORT_ERROR is not None:
            raise RuntimeError(unavailable_reason(problem.anchors.device))
        if problem.anchors.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the triton backend computes in float32 or float64, got "
                            f"{problem.anchors.dtype} (half inputs reach it upcast to float32 by "
                            f"the loss functions)")
        if problem.D > MAX_D:
            raise ValueError(f"the triton backend keeps whole rows in a tile and supports D <= "
                             f"{MAX_D}, got D = {problem.D}; use backend='torch' for wider "
                             f"embeddings")
        reason = self._shape_refusal(problem.D, _operand_dtype(problem), problem.anchors.device)
        if reason is not None:
            raise ValueError(reason)

    @staticmethod
    def _shape_refusal(d: int, op_dtype: torch.dtype, device: torch.device) -> Optional[str]:
        """On a GPU: why no measured tile shape serves width ``d`` with ``op_dtype`` operands
        (``None`` when one does). The interpreter has no registers or shared memory to run out
        of and accepts every width up to ``MAX_D``."""
        if _INTERPRET or device.type != "cuda":
            return None
        precision = precision_class(op_dtype)
        limit = device_shared_limit(device)
        if block_d_of(d) <= max_block_d(precision, limit):
            return None
        return _refusal(precision, d, limit)

    def width_reason(self, dim: int, dtype: torch.dtype,
                     device: Optional[torch.device]) -> Optional[str]:
        """``auto`` passes over triton where its compiled kernels would spill or not fit: per
        precision (``dtype``, the inputs' dtype; float32 under the current matmul precision)."""
        base = super().width_reason(dim, dtype, device)
        if base is not None or device is None or dtype not in _OPERAND_DTYPES:
            return base
        return self._shape_refusal(dim, dtype, device)

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
        # E4 from the forward's anchor-side accumulator: E_a = sum_k Q_ak u_k, so
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
