"""Backend ``"triton"``: the shared primitive as fused Triton kernels (GPU, or Triton's CPU
interpreter with ``TRITON_INTERPRET=1``).

The math (SPEC.md sections 3, 4 and 6). For anchor row ``a`` and candidate ``k``, ``u`` rows
already L2-normalised,

    S_ak     = anchors[a] . candidates[k]
    l_ak     = b_a * S_ak                                   (scaled map, b = inv_temp)
             = c * artanh(clamp(S_ak, -1 + e, 1 - e))       (artanh map, temperature-free)
    lse_neg  = log sum_{k in Neg(a)} exp(l_ak)              Neg(a): all k but p(a) and self(a)
    Q_ak     = exp(l_ak - lse_neg[a])                       (0 off Neg(a))

Backward, for an upstream gradient ``g`` of ``lse_neg``: ``G_ak = dL/dS_ak = g_a Q_ak l'_ak`` with
the slope ``l'_ak = b_a`` (scaled) or ``c / (1 - S_ak^2)`` inside the clamp and 0 outside
(artanh: self and duplicates sit at ``S = +-1``, outside the clamp, so their slope is a finite 0,
never ``0 * inf``), and

    d anchors[a]    = sum_k G_ak u_k            d candidates[k] = sum_a G_ak u_a
    d b_a           = g_a sum_k Q_ak S_ak       (scaled map only)

Both ``Q`` and ``G`` are recomputed from the saved per-row ``lse_neg`` (FlashAttention's pattern);
nothing of size ``M x K`` is ever stored.

Passes and GEMM work (one "GEMM" = ``2 M K D`` flops over the whole ``M x K`` tile grid):

* cross layouts (``anchors`` and ``candidates`` differ), gradients required:
  - forward (``_forward_kernel``, one program per block of anchor rows, streaming candidate
    tiles): ``S = A C^T`` (1 GEMM), the online max/sum for ``lse_neg`` and, rescaled online like
    attention's output, ``E_a = sum_k Q_ak l'_ak u_k`` (``F_a = sum_k Q_ak u_k`` for the scaled map)
    with a second ``tl.dot`` (1 GEMM). Then the anchor side of backward is a per-row scale:
    ``d anchors = g_a b_a F_a`` (artanh: ``g_a E_a``) and ``d b_a = g_a anchors[a] . F_a``.
  - backward (``_candidates_kernel``, one program per block of candidates looping over every
    anchor block: column-ordered, no atomics, deterministic): recompute ``S^T`` (1 GEMM), form
    ``G^T`` from the saved statistics, accumulate ``G^T A`` (1 GEMM).
  Total 2 passes, 4 GEMMs (``8 M K D`` flops); 1 GEMM when no gradient is required.
* layout ``2n`` on one process (``anchors is candidates``, ``S`` symmetric): the forward keeps
  only ``lse_neg`` (1 GEMM); the backward's column-ordered pass builds, from one recompute of the
  tile, both ``G_ak`` (column side, anchor ``a``'s statistics) and ``G_ka`` (row side, candidate
  ``k``'s own statistics, since ``S_ka = S_ak``) and accumulates ``(G + G^T) U`` (1 GEMM), plus
  ``d b`` of the row side. Total 2 passes, 3 GEMMs (``6 M^2 D`` flops) instead of 4 - the
  symmetry saves the anchor-side accumulation. (The forward still computes each off-diagonal tile
  for both of its row blocks: sharing it there needs a cross-program merge of online statistics.)
  Whether this wins on a GPU is for the benchmark to say (``bench/bench_triton_gpu.py``, backend
  ``triton_nosym`` turns it off via ``USE_SYMMETRY``): at D = 128 in bf16 a tile's ``exp`` work is
  comparable to its GEMM work, and the symmetric backward evaluates two exponentials per element
  (rows' and columns' ``Q``) where the general path's backward evaluates one (3 vs 2 over both
  passes), against 3 vs 4 GEMMs.
* CLIP (``cross_sym``) reaches this module as two cross blocks (``u1`` vs ``u2`` and back):
  2 x 4 GEMMs of ``N x N x D``.

Extra memory: ``lse_neg`` (``M``), ``E`` (``M x D``, only when a gradient is required), the
rounded half-precision operands (``(M + K) x D``, half inputs only), the gradients: ``O((M+K) D)``.

Precision: statistics, ``E`` and every accumulator are float32 (float64 for float64 inputs).
Half-precision inputs (``operand_dtype`` float16/bfloat16) are rounded back to that dtype for the
``tl.dot`` operands (tensor cores, fp32 accumulation), except that with float16 the weight GEMMs
(``Q l'`` and ``G`` against rows) run in tf32: those weights can exceed float16's 65504 (artanh
slopes, loss-scaled upstream gradients), tf32 has float32's range and float16's mantissa. float32
operands use tf32 only when ``torch.get_float32_matmul_precision() != "highest"``. float64 runs as
float64 ``tl.dot`` (exact to float64 rounding; on a GPU it is slow, FMA-based - use it to check,
not to train).

Tested: under the interpreter against the float64 reference (every loss, layout, reduction;
fp32 / fp64 / bf16 / fp16); the compiled kernels are built for sm_90 without a GPU by
``tests/test_triton_backend.py`` (Triton's bundled ptxas); the GPU tests there run them for real.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from .. import _ops

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
# The GPU tests cover D <= 512; 513..1024 get the smallest tiles (16 x 32) and are untested there.
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

    @triton.jit
    def _logit(S, b, artanh_scale, artanh_eps, ARTANH: tl.constexpr):
        """``l = b * S`` or ``c * artanh(clamp(S))``; ``b`` comes broadcast to ``S``'s shape."""
        if ARTANH:
            x = tl.minimum(tl.maximum(S, -1.0 + artanh_eps), 1.0 - artanh_eps)
            return (0.5 * artanh_scale) * tl.log((1.0 + x) / (1.0 - x))
        else:
            return b * S

    @triton.jit
    def _slope(S, b, artanh_scale, artanh_eps, ARTANH: tl.constexpr):
        """``dl/dS``: ``b``, or ``c / (1 - S^2)`` inside the clamp and 0 where it clamps (self and
        duplicates at ``S = +-1``): a finite 0, so a zero ``Q`` there never meets an infinity."""
        if ARTANH:
            inside = tl.abs(S) < 1.0 - artanh_eps
            return tl.where(inside, artanh_scale / tl.where(inside, 1.0 - S * S, 1.0), 0.0)
        else:
            return b

    @triton.jit
    def _g_dot(w, y, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, G_WIDE: tl.constexpr):
        """``w @ y`` for the weight GEMMs (``Q l'`` in forward, ``G`` in backward). ``G_WIDE``
        (float16 operands): ``w`` can exceed float16's 65504 (the artanh slope reaches ``c / 2e``,
        upstream gradients are scaled by loss scalers), so these run in tf32: float32's range,
        float16's 10-bit mantissa, still on the tensor cores."""
        if G_WIDE:
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
        A, C, B, POS, SELF, LSE, E,
        M, K, D, stride_a, stride_c, stride_e,
        artanh_scale, artanh_eps,
        ARTANH: tl.constexpr, HAS_SELF: tl.constexpr, ACC_E: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, G_WIDE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of anchor rows against every candidate tile: ``lse_neg`` and, if ``ACC_E``,
        ``E_a = sum_k Q_ak w_ak u_k`` (``w = 1`` scaled map, ``w = l'`` artanh map)."""
        acc_ty = LSE.dtype.element_ty  # float32, or float64 for float64 inputs
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < M
        d_ok = offs_d < D
        a = tl.load(A + offs_m[:, None] * stride_a + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # B is a valid dummy pointer for the artanh map (its values are then unused); likewise
        # SELF without HAS_SELF.
        b = tl.load(B + offs_m, mask=row_ok, other=0.0).to(acc_ty)
        pos = tl.load(POS + offs_m, mask=row_ok, other=-1)
        slf = tl.load(SELF + offs_m, mask=row_ok, other=-1)

        m_i = tl.full([BLOCK_M], float("-inf"), acc_ty)  # running max of the row's logits
        s_i = tl.zeros([BLOCK_M], acc_ty)  # running sum of exp(l - m_i)
        e_i = tl.zeros([BLOCK_M, BLOCK_D], acc_ty)  # running sum of exp(l - m_i) w u_k
        for n0 in range(0, K, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < K
            c = tl.load(C + offs_n[:, None] * stride_c + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            S = _dot(a, tl.trans(c), DOT_PRECISION, UPCAST).to(acc_ty)
            # Neg(a): in range, not the positive, not self - excluded by index, as -inf.
            keep = col_ok[None, :] & (offs_n[None, :] != pos[:, None])
            if HAS_SELF:
                keep = keep & (offs_n[None, :] != slf[:, None])
            l = tl.where(keep, _logit(S, b[:, None], artanh_scale, artanh_eps, ARTANH),
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(l, axis=1))
            # A row with nothing kept yet has m_new = -inf: shift by 0 there, not by -inf
            # (-inf - -inf would be NaN); its exp terms are then exp(-inf) = 0.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp(m_i - m_ref)
            p = tl.exp(l - m_ref[:, None])
            s_i = s_i * rescale + tl.sum(p, axis=1)
            if ACC_E:
                if ARTANH:
                    p = p * _slope(S, b[:, None], artanh_scale, artanh_eps, ARTANH)
                e_i = e_i * rescale[:, None] + _g_dot(p, c, DOT_PRECISION, UPCAST,
                                                       G_WIDE).to(acc_ty)
            m_i = m_new
        has_neg = s_i > 0
        lse = tl.where(has_neg, m_i + tl.log(tl.where(has_neg, s_i, 1.0)), float("-inf"))
        tl.store(LSE + offs_m, lse, mask=row_ok)
        if ACC_E:
            e_i = e_i / tl.where(has_neg, s_i, 1.0)[:, None]  # sum exp(l - m) -> sum Q
            tl.store(E + offs_m[:, None] * stride_e + offs_d[None, :], e_i,
                     mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _candidates_kernel(
        A, C, B, POS, SELF, LSE, G, DC, DB,
        M, K, D, stride_a, stride_c, stride_dc,
        artanh_scale, artanh_eps,
        ARTANH: tl.constexpr, HAS_SELF: tl.constexpr, SYMMETRIC: tl.constexpr,
        NEED_DB: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        G_WIDE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of candidates against every anchor block (column order: each program owns
        its output rows, so no atomics and a deterministic sum):
        ``dC_k = sum_a G_ak u_a``. ``SYMMETRIC`` (``A`` is ``C``): candidate ``k`` is anchor ``k``
        too, and the same recomputed tile also gives its row side ``G_ka = G'(S_ak)``, so
        ``dU_k = sum_a (G_ak + G_ka) u_a`` and ``d b_k = g_k sum_a Q_ka S_ka``."""
        acc_ty = LSE.dtype.element_ty
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < K
        d_ok = offs_d < D
        c = tl.load(C + offs_n[:, None] * stride_c + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        dc = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
        db = tl.zeros([BLOCK_N], acc_ty)
        if SYMMETRIC:  # candidate k's own row statistics (K == M)
            b_k = tl.load(B + offs_n, mask=col_ok, other=0.0).to(acc_ty)
            pos_k = tl.load(POS + offs_n, mask=col_ok, other=-1)
            slf_k = tl.load(SELF + offs_n, mask=col_ok, other=-1)
            lse_k = tl.load(LSE + offs_n, mask=col_ok, other=0.0)
            g_k = tl.load(G + offs_n, mask=col_ok, other=0.0).to(acc_ty)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            a = tl.load(A + offs_m[:, None] * stride_a + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b_a = tl.load(B + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            pos_a = tl.load(POS + offs_m, mask=row_ok, other=-1)
            slf_a = tl.load(SELF + offs_m, mask=row_ok, other=-1)
            lse_a = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
            g_a = tl.load(G + offs_m, mask=row_ok, other=0.0).to(acc_ty)
            St = _dot(c, tl.trans(a), DOT_PRECISION, UPCAST).to(acc_ty)  # St[k,a]=S_ak
            in_range = col_ok[:, None] & row_ok[None, :]
            # Column side: anchor a's Q_ak over its Neg(a).
            keep = in_range & (offs_n[:, None] != pos_a[None, :])
            if HAS_SELF:
                keep = keep & (offs_n[:, None] != slf_a[None, :])
            l = tl.where(keep, _logit(St, b_a[None, :], artanh_scale, artanh_eps, ARTANH),
                         float("-inf"))
            q = tl.exp(l - lse_a[None, :])
            gt = (g_a[None, :] * q) * _slope(St, b_a[None, :], artanh_scale, artanh_eps, ARTANH)
            if SYMMETRIC:
                # Row side: candidate k as an anchor, Q_ka over Neg(k), S_ka = S_ak.
                keep_k = in_range & (offs_m[None, :] != pos_k[:, None])
                if HAS_SELF:
                    keep_k = keep_k & (offs_m[None, :] != slf_k[:, None])
                l_k = tl.where(keep_k, _logit(St, b_k[:, None], artanh_scale, artanh_eps, ARTANH),
                               float("-inf"))
                gq_k = g_k[:, None] * tl.exp(l_k - lse_k[:, None])
                gt += gq_k * _slope(St, b_k[:, None], artanh_scale, artanh_eps, ARTANH)
                if NEED_DB:
                    db += tl.sum(gq_k * St, axis=1)
            dc += _g_dot(gt, a, DOT_PRECISION, UPCAST, G_WIDE).to(acc_ty)
        tl.store(DC + offs_n[:, None] * stride_dc + offs_d[None, :], dc,
                 mask=col_ok[:, None] & d_ok[None, :])
        if SYMMETRIC and NEED_DB:
            tl.store(DB + offs_n, db, mask=col_ok)

    # ----------------------------------------------------------------------------------------
    # GPU tile shapes: a small autotune space keyed on D (and, automatically, the dtypes), pruned
    # to what fits an H100 SM (228 KB shared memory, 64K 32-bit registers). Not yet measured: the
    # bench script (bench/bench_triton_gpu.py) records the timings the choice rests on.
    # ----------------------------------------------------------------------------------------

    # (BLOCK_M, BLOCK_N, num_warps, num_stages): FlashAttention-like shapes. Kept short on purpose:
    # every config of every flag combination is compiled once per process during autotuning.
    _GPU_SHAPES = [
        (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2),
        (128, 128, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2),
        (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 1), (16, 32, 8, 1), (32, 16, 8, 1),
    ]

    def _gpu_configs():
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in _GPU_SHAPES]

    # Without autotuning (MACL_TRITON_AUTOTUNE=0, e.g. a test run that would otherwise compile
    # every config of every flag combination): the first of these that fits.
    _DEFAULT_SHAPES = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 1),
                       (16, 32, 8, 1), (32, 16, 8, 1)]

    def _fits(shape, block_d: int, elem: int, candidates_kernel: bool) -> bool:
        """Whether a shape fits an H100 SM without heavy register spilling. Registers: the
        program's resident block (anchors in forward, candidates in backward) with its fp32
        accumulator ``[BLOCK, BLOCK_D]``, plus the live ``BLOCK_M x BLOCK_N`` tiles (about two in
        the backward: the rows' and the columns' ``Q``), at most ~3072 fp32 values per warp.
        Measured offline with ptxas for sm_90 (bf16): e.g. forward 128 x 64 at D = 256 spills
        232 bytes/thread, backward 64 x 128 at D = 128 spills 320, while every shape kept here
        spills at most 48. Shared memory: the resident block and one streamed tile per stage."""
        bm, bn, warps, stages = shape
        resident, streamed = (bn, bm) if candidates_kernel else (bm, bn)
        live = resident * block_d + (2 if candidates_kernel else 1) * bm * bn
        return (live <= 3072 * warps
                and (resident + streamed * stages) * block_d * elem <= 200 * 1024)

    def _prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d, elem, cand = args["BLOCK_D"], args["A"].element_size(), "DC" in args
        kept = [cfg for cfg in configs if _fits(
            (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages),
            block_d, elem, cand)]
        # The smallest shape always compiles (it may spill for huge D).
        return kept or [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1)]

    def _default_shape(block_d: int, elem: int, candidates_kernel: bool):
        for shape in _DEFAULT_SHAPES:
            if _fits(shape, block_d, elem, candidates_kernel):
                return shape
        return _DEFAULT_SHAPES[-1]

    # Each kernel writes its outputs without reading them, so benchmarking configs on the real
    # buffers is harmless (no reset_to_zero needed). Under the interpreter these are never used.
    _TUNED = {  # by name: the JIT function objects need not be hashable in every Triton
        "_forward_kernel": triton.autotune(
            configs=_gpu_configs(), prune_configs_by={"early_config_prune": _prune},
            key=["BLOCK_D", "ARTANH", "HAS_SELF", "ACC_E", "DOT_PRECISION"],
        )(_forward_kernel),
        "_candidates_kernel": triton.autotune(
            configs=_gpu_configs(), prune_configs_by={"early_config_prune": _prune},
            key=["BLOCK_D", "ARTANH", "HAS_SELF", "SYMMETRIC", "NEED_DB", "DOT_PRECISION"],
        )(_candidates_kernel),
    }


def _launch(kernel, grid_rows: int, block_key: str, args, **flags):
    """Launch ``kernel`` over ``grid_rows`` rows: under the interpreter with the fixed small
    blocks; on a GPU (on the tensors' device: Triton launches on the current one) through the
    autotuner, or with the default shape when ``AUTOTUNE`` is off."""
    if _INTERPRET:
        blocks = dict(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=INTERPRETER_BLOCK_N)
        kernel[(triton.cdiv(grid_rows, blocks[block_key]),)](*args, **flags, **blocks)
        return
    with torch.cuda.device(args[0].device):
        if AUTOTUNE:
            tuned = _TUNED[kernel.__name__]
            tuned[lambda meta: (triton.cdiv(grid_rows, meta[block_key]),)](*args, **flags)
        else:
            bm, bn, warps, stages = _default_shape(flags["BLOCK_D"], args[0].element_size(),
                                                   kernel is _candidates_kernel)
            blocks = dict(BLOCK_M=bm, BLOCK_N=bn)
            kernel[(triton.cdiv(grid_rows, blocks[block_key]),)](
                *args, **flags, **blocks, num_warps=warps, num_stages=stages)


def _dot_precision(op_dtype: torch.dtype) -> str:
    if op_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


class _Operands(NamedTuple):
    """What the kernels read: contiguous rows, the operand copies (rounded to half precision for
    half inputs: plain data, the gradient flows through anchors/candidates), int32 indices."""

    anchors: torch.Tensor
    candidates: torch.Tensor
    op_anchors: torch.Tensor
    op_candidates: torch.Tensor
    inv_temp: Optional[torch.Tensor]
    pos_index: torch.Tensor
    self_index: Optional[torch.Tensor]
    symmetric: bool  # layout 2n on one process, and the symmetric backward switched on


def _check(anchors, candidates) -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(unavailable_reason(anchors.device))
    if anchors.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the triton backend computes in float32 or float64, got {anchors.dtype} "
                        f"(half inputs reach it upcast to float32 by the loss functions)")
    if candidates is not None and candidates.dtype != anchors.dtype:
        raise TypeError(f"anchors and candidates must share a dtype, got {anchors.dtype} and "
                        f"{candidates.dtype}")
    if anchors.shape[1] > MAX_D:
        raise ValueError(f"the triton backend keeps whole rows in a tile and supports D <= "
                         f"{MAX_D}, got D = {anchors.shape[1]}; use backend='torch' for wider "
                         f"embeddings")


def _operands(anchors, candidates, inv_temp, pos_index, self_index, operand_dtype) -> _Operands:
    """The kernels' view of the arguments; ``candidates=None``: the anchors."""
    _check(anchors, candidates)
    symmetric = USE_SYMMETRY and candidates is None
    anchors_c = anchors.contiguous()
    candidates_c = anchors_c if candidates is None else candidates.contiguous()
    op_dtype = anchors.dtype
    if anchors.dtype == torch.float32 and operand_dtype in (torch.float16, torch.bfloat16):
        op_dtype = operand_dtype
    op_anchors = anchors_c.detach().to(op_dtype)
    op_candidates = op_anchors if candidates is None else candidates_c.detach().to(op_dtype)
    return _Operands(
        anchors_c, candidates_c, op_anchors, op_candidates,
        None if inv_temp is None else inv_temp.to(anchors.dtype).contiguous(),
        pos_index.to(torch.int32).contiguous(),
        None if self_index is None else self_index.to(torch.int32).contiguous(), symmetric)


def _flags(op_dtype: torch.dtype, D: int) -> dict:
    return dict(block_d=max(16, triton.next_power_of_2(D)), precision=_dot_precision(op_dtype),
                upcast=_INTERPRET and op_dtype == torch.bfloat16,
                g_wide=op_dtype == torch.float16)


def _run_forward(ops: _Operands, artanh_scale, artanh_eps, acc_e: bool):
    """``lse_neg`` and, when ``acc_e``, the anchor-side accumulator ``E`` (``None`` otherwise)."""
    M, D = ops.anchors.shape
    K = ops.candidates.shape[0]
    artanh = artanh_scale is not None
    lse = ops.anchors.new_empty(M)
    E = ops.anchors.new_empty((M, D)) if acc_e else lse
    b = ops.inv_temp if ops.inv_temp is not None else lse  # dummy pointer for the artanh map
    slf = ops.self_index if ops.self_index is not None else ops.pos_index
    f = _flags(ops.op_anchors.dtype, D)
    _launch(
        _forward_kernel, M, "BLOCK_M",
        (ops.op_anchors, ops.op_candidates, b, ops.pos_index, slf, lse, E, M, K, D,
         ops.op_anchors.stride(0), ops.op_candidates.stride(0), E.stride(0),
         float(artanh_scale) if artanh else 0.0, float(artanh_eps)),
        ARTANH=artanh, HAS_SELF=ops.self_index is not None, ACC_E=acc_e,
        DOT_PRECISION=f["precision"], UPCAST=f["upcast"],
        G_WIDE=f["g_wide"] and artanh,  # the scaled map's weights exp(l - m) are <= 1
        BLOCK_D=f["block_d"],
    )
    return lse, (E if acc_e else None)


def _run_backward(ops: _Operands, artanh_scale, artanh_eps, lse, E, grad_lse, need_a, need_c,
                  need_b):
    """``(d anchors, d candidates, d inv_temp)``; symmetric: d anchors is the whole gradient of
    the one tensor (``(G + G^T) U``) and d candidates is ``None``."""
    artanh = artanh_scale is not None
    M, D = ops.anchors.shape
    K = ops.candidates.shape[0]
    g = grad_lse.to(ops.anchors.dtype).contiguous()
    f = _flags(ops.op_anchors.dtype, D)
    grad_a = grad_c = grad_b = None
    symmetric = ops.symmetric
    if need_c or (symmetric and (need_a or need_b)):
        dC = ops.anchors.new_empty((K, D))
        need_db = symmetric and need_b
        dB = ops.anchors.new_empty(M) if need_db else lse
        _launch(
            _candidates_kernel, K, "BLOCK_N",
            (ops.op_anchors, ops.op_candidates,
             ops.inv_temp if ops.inv_temp is not None else lse, ops.pos_index,
             ops.self_index if ops.self_index is not None else ops.pos_index, lse, g, dC, dB,
             M, K, D, ops.op_anchors.stride(0), ops.op_candidates.stride(0), dC.stride(0),
             float(artanh_scale) if artanh else 0.0, float(artanh_eps)),
            ARTANH=artanh, HAS_SELF=ops.self_index is not None, SYMMETRIC=symmetric,
            NEED_DB=need_db, DOT_PRECISION=f["precision"], UPCAST=f["upcast"],
            G_WIDE=f["g_wide"], BLOCK_D=f["block_d"],
        )
        if symmetric:
            grad_a = dC if (need_a or need_c) else None
            grad_b = dB if need_db else None
        else:
            grad_c = dC
    if not symmetric and (need_a or need_b):
        # Anchor side from the forward's E: a per-row scale, no second pass over the tiles.
        if artanh:
            grad_a = g[:, None] * E if need_a else None
        else:
            if need_a:
                grad_a = (g * ops.inv_temp)[:, None] * E
            if need_b:
                grad_b = g * (ops.anchors * E).sum(dim=1)
    return grad_a, grad_c, grad_b


def _accumulates_e(candidates, need_grad: bool) -> bool:
    # E serves the anchor side (and d b) of a non-symmetric block; a symmetric block gets
    # everything from the backward pass.
    return need_grad and not (USE_SYMMETRY and candidates is None)


def fwd(anchors, candidates, inv_temp, pos_index, self_index, artanh_scale, artanh_eps, *,
        operand_dtype=None, need_grad=True):
    """The custom-op protocol of ``macl_kernels/_ops.py`` (``candidates=None``: layout 2n on one
    process). ``aux`` is ``E`` when a non-symmetric block needs gradients."""
    ops = _operands(anchors, candidates, inv_temp, pos_index, self_index, operand_dtype)
    acc_e = _accumulates_e(candidates, need_grad)
    if anchors.dtype == torch.float64 and anchors.device.type == "cuda":
        try:
            return _run_forward(ops, artanh_scale, artanh_eps, acc_e)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # a Triton build without float64 tl.dot for this GPU
            raise TypeError(
                f"the triton backend could not compile its float64 kernels on this GPU "
                f"({type(exc).__name__}: {str(exc)[:200]}); use backend='torch' for float64"
            ) from exc
    return _run_forward(ops, artanh_scale, artanh_eps, acc_e)


def bwd(anchors, candidates, inv_temp, pos_index, self_index, lse_neg, aux, grad_lse_neg,
        artanh_scale, artanh_eps, *, operand_dtype=None, need_anchors=True,
        need_candidates=True, need_inv_temp=True):
    ops = _operands(anchors, candidates, inv_temp, pos_index, self_index, operand_dtype)
    one_tensor = candidates is None
    if one_tensor and not ops.symmetric:  # USE_SYMMETRY off: both sides, then their sum
        need_anchors = need_candidates = need_anchors or need_candidates
    grad_a, grad_c, grad_b = _run_backward(ops, artanh_scale, artanh_eps, lse_neg, aux,
                                           grad_lse_neg, need_anchors, need_candidates,
                                           need_inv_temp and inv_temp is not None)
    if one_tensor and not ops.symmetric:
        grad_a, grad_c = (grad_a + grad_c if grad_a is not None else None), None
    return grad_a, grad_c, grad_b


def fake_aux(anchors, candidates, need_grad):
    return anchors.new_empty(anchors.shape) if _accumulates_e(candidates, need_grad) else None


def negative_lse(anchors: torch.Tensor, candidates: torch.Tensor, inv_temp: Optional[torch.Tensor],
                 pos_index: torch.Tensor, self_index: Optional[torch.Tensor],
                 artanh_scale: Optional[float], artanh_eps: float, *,
                 operand_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The primitive's entry point (see ``torch_chunked.negative_lse``), through the custom op.
    Computes in the dtype of ``anchors`` (float32 or float64); with ``operand_dtype``
    float16/bfloat16 the GEMM operands are rounded to it (tensor cores, fp32 accumulation).
    Passing one tensor as both ``anchors`` and ``candidates`` selects the symmetric backward."""
    _check(anchors, None if candidates is anchors else candidates)
    return _ops.negative_lse("triton", anchors, None if candidates is anchors else candidates,
                             inv_temp, pos_index, self_index, artanh_scale, artanh_eps,
                             operand_dtype)
