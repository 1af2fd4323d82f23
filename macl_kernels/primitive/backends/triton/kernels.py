"""The Triton backend's kernels: the shared primitive as fused ``@triton.jit`` kernels and their
jit helpers (compiled for a GPU, or run by Triton's CPU interpreter with ``TRITON_INTERPRET=1``).
They are launched through the kernel table of ``launch.py`` (``KERNELS``), never directly.

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

Both ``Q`` and ``dL_dS`` are recomputed from the saved per-row ``lse_neg`` (FlashAttention's
pattern); nothing of size ``M x K`` is ever stored.

Passes and GEMM work (one "GEMM" = ``2 M K D`` flops over the whole ``M x K`` tile grid):

* cross layouts (``anchors`` and ``candidates`` differ), gradients required:
  - forward (``forward_kernel``, one program per block of anchor rows, streaming candidate
    tiles): ``S = A C^T`` (1 GEMM), the online max/sum for ``lse_neg`` and, rescaled online like
    attention's output, ``E_a = sum_k Q_ak dl_dS_ak u_k`` for ARTANH (``E_a = sum_k Q_ak u_k``
    for SCALED) with a second ``tl.dot`` (1 GEMM). Then the anchor side of backward is a per-row
    scale: ``d_anchors = g_a inv_temp[a] E_a`` (ARTANH: ``g_a E_a``) and
    ``d_inv_temp[a] = g_a anchors[a] . E_a``.
  - backward (``candidates_kernel``, one program per block of candidates looping over every
    anchor block: column-ordered, no atomics, deterministic): recompute ``S^T`` (1 GEMM), form
    ``dL_dS^T`` from the saved statistics, accumulate ``dL_dS^T anchors`` (1 GEMM).
  Total 2 passes, 4 GEMMs (``8 M K D`` flops); 1 GEMM when no gradient is required.
* layout ``2n`` on one process (``anchors is candidates``, ``S`` symmetric): the forward keeps
  only ``lse_neg`` (1 GEMM); the backward's column-ordered pass (``candidates_kernel`` with
  ``MIRRORED``, the rows' own entries as ``mirrored_*``) treats every tile as mirrored (its
  columns are anchors too): from one recompute of the tile it builds both ``dL_dS_ak`` (row
  side: anchor ``a``'s statistics) and ``dL_dS_ka`` (mirrored side: candidate ``k`` as an
  anchor, with its own statistics, since ``S_ka = S_ak``) and accumulates the one tensor's whole
  gradient ``(dL_dS + dL_dS^T) U`` (1 GEMM), plus ``d_inv_temp`` of the mirrored side. Total 2
  passes, 3 GEMMs (``6 M^2 D`` flops) instead of 4 - the symmetry saves the anchor-side
  accumulation. (The forward still computes each off-diagonal tile for both of its row blocks:
  sharing it there needs a cross-program merge of online statistics.) Whether this wins on a GPU
  is for the benchmark to say (``bench/gpu/bench_triton_gpu.py``, backend ``triton_nosym`` turns
  it off via ``config.USE_SYMMETRY``): at D = 128 in bf16 a tile's ``exp`` work is comparable to
  its GEMM work, and the symmetric backward evaluates two exponentials per element
  (rows' and columns' ``Q``) where the general path's backward evaluates one (3 vs 2 over both
  passes), against 3 vs 4 GEMMs.
* layout ``cross_sym`` on one process (``Problem.both_directions``: CLIP's two directions):
  ``both_forward_kernel`` computes each tile once for the rows' online statistics and stores
  each column's partial (max, sum) per row block; a tiny merge in block order gives the columns'
  ``lse_neg`` (no atomics; extra memory ``2 K cdiv(M, BLOCK_M)``). Every tile is mirrored: its
  columns are anchors too (``mirrored_*`` pointers: the columns' per-anchor entries). Backward:
  the same ``candidates_kernel`` with ``MIRRORED`` as layout ``2n`` (one kernel family for both
  mirrored problems, as the C++ backend models them), launched once per side (rows' gradient,
  columns' gradient; table entry ``both_backward``), each forming both directions' ``dL_dS``
  from one recompute of the tile. 5 GEMMs of ``N x N x D`` instead of
  2 x 4 as two cross blocks (docs/math.md#both-directions-of-one-s-layout-cross_sym).

* ``RowReduction.SOFTPLUS`` (SigLIP, ``docs/math.md#siglip``), cross problems, SCALED map, with a
  per-row bias: sibling kernels sharing the helpers. ``softplus_forward_kernel`` sums
  ``softplus(l)`` per row (no running max: a plain sum) and, when a gradient is required,
  accumulates ``E_a = sum_k sigmoid(l_ak) u_k`` (1 GEMM) and ``sum_k sigmoid(l_ak)`` into
  ``aux [M, D + 1]`` - no rescaling, since ``sigmoid`` needs no row statistic. The anchor side is
  then a per-row scale (``d_anchors = g_a inv_temp[a] E_a``, ``d_inv_temp = g_a anchors[a] .
  E_a``, ``d_row_bias = g_a sum_k sigmoid``); ``softplus_candidates_kernel`` is the
  column-ordered candidate pass. 2 passes, 4 GEMMs (``8 M K D`` flops), as the cross LSE path.

Extra memory: ``lse_neg`` (``M``), ``E`` (``M x D``, only when a gradient is required), the
rounded half-precision operands (``(M + K) x D``, half inputs only), the gradients: ``O((M+K) D)``.

Precision: statistics, ``E`` and every accumulator are float32 (float64 for float64 inputs).
Half-precision inputs (``operand_dtype`` float16/bfloat16) are rounded back to that dtype for the
``tl.dot`` operands (tensor cores, fp32 accumulation), except that with float16 the weight
GEMMs (``Q dl_dS`` and ``dL_dS`` against rows) run in tf32: those weights can exceed float16's
65504 (artanh slopes, loss-scaled upstream gradients), tf32 has float32's range and float16's
mantissa. float32
operands run 3xTF32 at torch's default matmul precision ("highest": about float32's accuracy,
docs/math.md#tolerances) and plain tf32 when ``torch.get_float32_matmul_precision()`` allows it.
float64 runs as float64 ``tl.dot`` (exact to float64 rounding; on a GPU it is slow, FMA-based -
use it to check, not to train). The artanh map's scalars arrive as a tensor of the compute dtype
and row offsets are 64-bit (``row * stride`` passes 2^31 for large candidate banks).

Indices: ``pos_index`` and ``self_index`` arrive as int32 (``backend.py`` narrows the int64 of
``Problem``): the tile offsets they are compared with (``tl.arange``) are int32 and a row count
stays below 2^31. Labels stay int64 (arbitrary integers, never narrowed).

GPU tile shapes: measured per precision, kernel kind and width (``config.SHAPES``; at most 1 KB
of spill, within an H100's shared memory); a width without a shape is refused on a GPU.

Tested: under the interpreter against the float64 reference (every loss, layout, reduction;
fp32 / fp64 / bf16 / fp16); the compiled kernels are built for sm_90 without a GPU by
``tests/test_triton_backend.py`` and inventoried by ``tests/test_kernel_inventory.py``
(``macl-kernels kernels``, Triton's bundled ptxas); the GPU tests there, in
``tests/test_gpu_smoke.py`` and in ``tests/test_primitive.py`` run them for real.
"""

from __future__ import annotations

from ...protocol import LogitMap

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - config.IMPORT_ERROR says why
    triton = tl = None

if triton is not None:
    # LogitMap's values as Triton constants (macl_kernels/primitive/protocol.py): ``LOGIT_MAP`` is a
    # constexpr, so each map compiles to its own kernel with the other branch removed.
    LOGIT_MAP_SCALED = tl.constexpr(int(LogitMap.SCALED))
    LOGIT_MAP_ARTANH = tl.constexpr(int(LogitMap.ARTANH))

    @triton.jit
    def logit(S, inv_temp, artanh_scale, artanh_eps, LOGIT_MAP: tl.constexpr):
        """``l = inv_temp * S`` or ``artanh_scale * artanh(clamp(S))``; ``inv_temp`` comes
        broadcast to ``S``'s shape."""
        if LOGIT_MAP == LOGIT_MAP_ARTANH:
            x = tl.minimum(tl.maximum(S, -1.0 + artanh_eps), 1.0 - artanh_eps)
            return (0.5 * artanh_scale) * tl.log((1.0 + x) / (1.0 - x))
        else:
            return inv_temp * S

    @triton.jit
    def dl_dS(S, inv_temp, artanh_scale, artanh_eps, LOGIT_MAP: tl.constexpr):
        """The slope ``dl_dS``: ``inv_temp``, or ``artanh_scale / (1 - S^2)`` inside the clamp
        and 0 where it clamps (self and duplicates at ``S = +-1``): a finite 0, so a zero ``Q``
        there never meets an infinity."""
        if LOGIT_MAP == LOGIT_MAP_ARTANH:
            inside = tl.abs(S) < 1.0 - artanh_eps
            return tl.where(inside, artanh_scale / tl.where(inside, 1.0 - S * S, 1.0), 0.0)
        else:
            return inv_temp

    @triton.jit
    def weights_dot(w, y, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     WIDE_WEIGHTS: tl.constexpr):
        """``w @ y`` for the weight GEMMs (``Q dl_dS`` in forward, ``dL_dS`` in backward).
        ``WIDE_WEIGHTS`` (float16 operands): ``w`` can exceed float16's 65504 (the artanh slope
        reaches ``artanh_scale / 2 artanh_eps``, upstream gradients are scaled by loss scalers),
        so these run in tf32: float32's range, float16's 10-bit mantissa, on the tensor cores."""
        if WIDE_WEIGHTS:
            return tl.dot(w, y.to(tl.float32), input_precision="tf32")
        else:
            return dot(w.to(y.dtype), y, DOT_PRECISION, UPCAST)

    @triton.jit
    def dot(x, y, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``x @ y`` with fp32 (fp64) accumulation. ``UPCAST``: Triton's interpreter mis-multiplies
        bfloat16 blocks (it treats them as raw 16-bit integers), so there the already-rounded
        operands are widened first - the same numbers a bf16 tensor-core dot with fp32
        accumulation produces, since a product of two bf16 values is exact in fp32."""
        if UPCAST:
            return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(x, y, input_precision=DOT_PRECISION)

    @triton.jit
    def forward_kernel(
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
            S = dot(anchors, tl.trans(candidates), DOT_PRECISION, UPCAST).to(acc_ty)
            # Neg(a): in range, not the positive, not self - excluded by index, as -inf.
            keep = col_ok[None, :] & (offs_n[None, :] != pos_index[:, None])
            if HAS_SELF:
                keep = keep & (offs_n[None, :] != self_index[:, None])
            if HAS_LABELS:  # same-label candidates are not negatives
                label_k = tl.load(candidate_labels_ptr + offs_n, mask=col_ok, other=-1)
                keep = keep & (label_k[None, :] != label_a[:, None])
            l = tl.where(keep, logit(S, inv_temp[:, None], artanh_scale, artanh_eps, LOGIT_MAP),
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
                    p = p * dl_dS(S, inv_temp[:, None], artanh_scale, artanh_eps, LOGIT_MAP)
                e_i = e_i * rescale[:, None] + weights_dot(p, candidates, DOT_PRECISION, UPCAST,
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
    def candidates_kernel(
        anchors_ptr, candidates_ptr, inv_temp_ptr, pos_index_ptr, self_index_ptr, lse_neg_ptr,
        g_ptr, mirrored_inv_temp_ptr, mirrored_pos_index_ptr, mirrored_self_index_ptr,
        mirrored_lse_neg_ptr, mirrored_g_ptr, d_candidates_ptr, d_inv_temp_ptr,
        M, K, D, stride_anchors, stride_candidates, stride_d_candidates,
        logit_params_ptr, anchor_labels_ptr, candidate_labels_ptr,
        LOGIT_MAP: tl.constexpr, HAS_SELF: tl.constexpr, MIRRORED: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        NEED_D_INV_TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        WIDE_WEIGHTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of candidates against every anchor block (column order: each program owns
        its output rows, so no atomics and a deterministic sum):
        ``d_candidates_k = sum_a dL_dS_ak u_a``. ``MIRRORED``: every tile is mirrored,
        candidate ``k`` is an anchor too, with its entries at ``mirrored_*[k]``, and the same
        recomputed tile also gives its mirrored side ``dL_dS_ka`` (``S_ka = S_ak``), so the
        block accumulates ``sum_a (dL_dS_ak + dL_dS_ka) u_a`` and ``d_inv_temp_k = g_k sum_a
        Q_ka S_ka``. One kernel for both mirrored problems (the C++ backend's model): layout
        ``2n`` (the anchors are the candidates and ``mirrored_*`` the rows' own entries: the
        one tensor's whole gradient in one pass) and both directions (``mirrored_*`` the
        columns' half of the ``M + K`` entries; launched once per side, the two sides swapping
        roles for the anchors' gradient: two passes, 2 GEMMs each). Without ``MIRRORED`` the
        ``mirrored_*`` pointers are unused dummies."""
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
        if HAS_LABELS:  # mirrored (2n): the candidates' labels are the anchors'
            label_k = tl.load(candidate_labels_ptr + offs_n, mask=col_ok, other=-1)
        if MIRRORED:  # the mirrored side: candidate k's entries as an anchor
            inv_temp_k = tl.load(mirrored_inv_temp_ptr + offs_n, mask=col_ok,
                                 other=0.0).to(acc_ty)
            pos_index_k = tl.load(mirrored_pos_index_ptr + offs_n, mask=col_ok, other=-1)
            self_index_k = tl.load(mirrored_self_index_ptr + offs_n, mask=col_ok, other=-1)
            lse_neg_k = tl.load(mirrored_lse_neg_ptr + offs_n, mask=col_ok, other=0.0)
            g_k = tl.load(mirrored_g_ptr + offs_n, mask=col_ok, other=0.0).to(acc_ty)
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
            St = dot(candidates, tl.trans(anchors), DOT_PRECISION, UPCAST).to(acc_ty)
            in_range = col_ok[:, None] & row_ok[None, :]
            # Row side: anchor a's Q_ak over its Neg(a).
            keep = in_range & (offs_n[:, None] != pos_index_a[None, :])
            if HAS_SELF:
                keep = keep & (offs_n[:, None] != self_index_a[None, :])
            if HAS_LABELS:
                label_a = tl.load(anchor_labels_ptr + offs_m, mask=row_ok, other=-1)
                keep = keep & (label_k[:, None] != label_a[None, :])
            l = tl.where(keep, logit(St, inv_temp_a[None, :], artanh_scale, artanh_eps,
                                     LOGIT_MAP), float("-inf"))
            Q = tl.exp(l - lse_neg_a[None, :])
            dL_dS_t = (g_a[None, :] * Q) * dl_dS(St, inv_temp_a[None, :], artanh_scale,
                                                 artanh_eps, LOGIT_MAP)
            if MIRRORED:
                # Mirrored side: candidate k as an anchor, Q_ka over Neg(k), S_ka = S_ak.
                keep_k = in_range & (offs_m[None, :] != pos_index_k[:, None])
                if HAS_SELF:
                    keep_k = keep_k & (offs_m[None, :] != self_index_k[:, None])
                if HAS_LABELS:  # equal labels: the pair is symmetric
                    keep_k = keep_k & (label_k[:, None] != label_a[None, :])
                l_k = tl.where(keep_k, logit(St, inv_temp_k[:, None], artanh_scale, artanh_eps,
                                             LOGIT_MAP), float("-inf"))
                dL_dl_k = g_k[:, None] * tl.exp(l_k - lse_neg_k[:, None])
                dL_dS_t += dL_dl_k * dl_dS(St, inv_temp_k[:, None], artanh_scale, artanh_eps,
                                           LOGIT_MAP)
                if NEED_D_INV_TEMP:
                    d_inv_temp += tl.sum(dL_dl_k * St, axis=1)
            d_candidates += weights_dot(dL_dS_t, anchors, DOT_PRECISION, UPCAST,
                                        WIDE_WEIGHTS).to(acc_ty)
        tl.store(d_candidates_ptr + offs_n.to(tl.int64)[:, None] * stride_d_candidates
                 + offs_d[None, :],
                 d_candidates, mask=col_ok[:, None] & d_ok[None, :])
        if MIRRORED and NEED_D_INV_TEMP:
            tl.store(d_inv_temp_ptr + offs_n, d_inv_temp, mask=col_ok)

    # ----------------------------------------------------------------------------------------
    # Both directions (layout cross_sym on one process, Problem.both_directions): the rows of S
    # are anchors against the candidates and its columns anchors against the rows. The per-anchor
    # arrays have M + K entries (rows, then columns); the kernels get the two halves as separate
    # pointers. The backward is candidates_kernel with MIRRORED (above).
    # ----------------------------------------------------------------------------------------

    @triton.jit
    def both_forward_kernel(
        anchors_ptr, candidates_ptr, inv_temp_ptr, pos_index_ptr, self_index_ptr,
        mirrored_inv_temp_ptr, mirrored_pos_index_ptr, mirrored_self_index_ptr, lse_neg_ptr,
        mirrored_max_ptr, mirrored_sum_ptr,
        M, K, D, stride_anchors, stride_candidates,
        logit_params_ptr,
        LOGIT_MAP: tl.constexpr, HAS_SELF: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One block of anchor rows against every candidate tile, each tile of ``S`` computed
        once for both directions (a mirrored tile: its columns are anchors too, with the
        ``mirrored_*`` entries): the rows' ``lse_neg`` (online, as ``forward_kernel``) and, per
        column, this block's partial ``(max, sum of exp(l - max))`` of the column's logits over
        these rows, stored at ``[program, column]`` of ``mirrored_max`` / ``mirrored_sum``
        (``[cdiv(M, BLOCK_M), K]``). A second, tiny pass merges the partials in block order: no
        atomics, deterministic."""
        acc_ty = lse_neg_ptr.dtype.element_ty
        # [artanh_scale, artanh_eps] in the compute dtype, as in forward_kernel.
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
            S = dot(anchors, tl.trans(candidates), DOT_PRECISION, UPCAST).to(acc_ty)
            in_range = row_ok[:, None] & col_ok[None, :]
            # Row side: anchor a against candidate k, Neg(a) without pos_index[a] (and self).
            keep = in_range & (offs_n[None, :] != pos_index[:, None])
            if HAS_SELF:
                keep = keep & (offs_n[None, :] != self_index[:, None])
            l = tl.where(keep, logit(S, inv_temp[:, None], artanh_scale, artanh_eps, LOGIT_MAP),
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(l, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(l - m_ref[:, None]), axis=1)
            m_i = m_new
            # Mirrored side: candidate k as an anchor against row a, without its positive (and
            # self) among the rows.
            inv_temp_k = tl.load(mirrored_inv_temp_ptr + offs_n, mask=col_ok,
                                 other=0.0).to(acc_ty)
            pos_index_k = tl.load(mirrored_pos_index_ptr + offs_n, mask=col_ok, other=-1)
            keep_k = in_range & (offs_m[:, None] != pos_index_k[None, :])
            if HAS_SELF:
                self_index_k = tl.load(mirrored_self_index_ptr + offs_n, mask=col_ok, other=-1)
                keep_k = keep_k & (offs_m[:, None] != self_index_k[None, :])
            l_k = tl.where(keep_k, logit(S, inv_temp_k[None, :], artanh_scale, artanh_eps,
                                         LOGIT_MAP), float("-inf"))
            # This block's partial (max, sum) per column, shifted as the rows' are.
            m_k = tl.max(l_k, axis=0)
            m_k_ref = tl.where(m_k == float("-inf"), 0.0, m_k)
            s_k = tl.sum(tl.exp(l_k - m_k_ref[None, :]), axis=0)
            tl.store(mirrored_max_ptr + partial_row + offs_n, m_k, mask=col_ok)
            tl.store(mirrored_sum_ptr + partial_row + offs_n, s_k, mask=col_ok)
        has_neg = s_i > 0
        lse_neg = tl.where(has_neg, m_i + tl.log(tl.where(has_neg, s_i, 1.0)), float("-inf"))
        tl.store(lse_neg_ptr + offs_m, lse_neg, mask=row_ok)

    # ----------------------------------------------------------------------------------------
    # RowReduction.SOFTPLUS (SigLIP): sibling kernels of the two above, sharing their helpers.
    # ----------------------------------------------------------------------------------------

    @triton.jit
    def softplus(x):
        """``softplus(x) = max(x, 0) + log1p(e^-|x|)`` at any ``x`` (0 at ``x = -inf``, an
        excluded pair). ``log1p(e)`` without a ``log1p``: ``log(u) * e / (u - 1)``, ``u = 1 + e``,
        exact to rounding (Goldberg), and ``e`` itself where ``u`` rounds to 1."""
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        return tl.where(x > 0.0, x, 0.0) + log1p_e

    @triton.jit
    def sigmoid(x):
        """``sigmoid(x)`` from ``e = e^-|x| <= 1``: no overflow at any ``x``; 0 at ``x = -inf``."""
        e = tl.exp(-tl.abs(x))
        r = 1.0 / (1.0 + e)
        return tl.where(x >= 0.0, r, e * r)

    @triton.jit
    def softplus_forward_kernel(
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
            S = dot(anchors, tl.trans(candidates), DOT_PRECISION, UPCAST).to(acc_ty)
            keep = col_ok[None, :] & (offs_n[None, :] != pos_index[:, None])
            if HAS_SELF:
                keep = keep & (offs_n[None, :] != self_index[:, None])
            l = tl.where(keep, inv_temp[:, None] * S + bias[:, None], float("-inf"))
            s_i += tl.sum(softplus(l), axis=1)
            if ACC_E:
                sig = sigmoid(l)  # <= 1: float16 operands hold it
                sig_i += tl.sum(sig, axis=1)
                e_i += weights_dot(sig, candidates, DOT_PRECISION, UPCAST, False).to(acc_ty)
        tl.store(sp_neg_ptr + offs_m, s_i, mask=row_ok)
        if ACC_E:
            tl.store(E_ptr + rows[:, None] * stride_E + offs_d[None, :], e_i,
                     mask=row_ok[:, None] & d_ok[None, :])
            tl.store(E_ptr + rows * stride_E + D, sig_i, mask=row_ok)

    @triton.jit
    def softplus_candidates_kernel(
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
            St = dot(candidates, tl.trans(anchors), DOT_PRECISION, UPCAST).to(acc_ty)
            keep = (col_ok[:, None] & row_ok[None, :]
                    & (offs_n[:, None] != pos_index_a[None, :]))
            if HAS_SELF:
                keep = keep & (offs_n[:, None] != self_index_a[None, :])
            l = tl.where(keep, inv_temp_a[None, :] * St + bias_a[None, :], float("-inf"))
            dL_dS_t = (g_a * inv_temp_a)[None, :] * sigmoid(l)
            d_candidates += weights_dot(dL_dS_t, anchors, DOT_PRECISION, UPCAST,
                                        WIDE_WEIGHTS).to(acc_ty)
        tl.store(d_candidates_ptr + cols[:, None] * stride_d_candidates + offs_d[None, :],
                 d_candidates, mask=col_ok[:, None] & d_ok[None, :])

