"""The Triton backend against the float64 reference.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before macl_kernels' Triton module is imported), on small shapes that still cross the
interpreter's 16-wide tiles with ragged edges (N in {2, 13, 40}, D in {7, 32}). With a GPU the same
tests run on CUDA tensors, and the ``gpu`` tests below add real sizes, half precisions and the
O((M + K) D) memory promise.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton): the triton "
                                     "backend cannot be tested")

import macl_kernels as mk  # noqa: E402
from conftest import (  # noqa: E402
    F32_RTOL, F64_RTOL, HALF_RTOL, LOSS_LAYOUTS, REDUCTIONS, assert_rel_close,
    assert_same_results, dense_negative_lse, loss_and_grads, loss_case, make_pair, upstream_like,
)
from macl_kernels.backends import triton_fused as TF  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# Where the kernels run: the GPU if there is one, else the CPU under the interpreter.
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")

pytestmark = pytest.mark.skipif(
    TF.unavailable_reason(DEVICE) is not None,
    reason=f"triton backend unusable here: {TF.unavailable_reason(DEVICE)}",
)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """On a GPU, one default tile shape per D instead of autotuning: otherwise the first call of
    every flag/dtype/D combination compiles and times every config (minutes over this file).
    ``test_gpu_autotuned_path`` turns autotuning back on."""
    monkeypatch.setattr(TF, "AUTOTUNE", False)
    # Under the interpreter: tl.dot's minimum tile, so that N in {13, 40} spans several ragged
    # tiles in both directions.
    monkeypatch.setattr(TF, "INTERPRETER_BLOCK_M", 16)
    monkeypatch.setattr(TF, "INTERPRETER_BLOCK_N", 16)


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def to_cpu(results):
    return [t.detach().cpu() for t in results]


def float64_may_be_unsupported(fn, *args, **kwargs):
    """On a GPU whose Triton cannot compile float64 ``tl.dot`` the backend raises TypeError
    (naming backend='torch'); that is a documented limitation, not a failure."""
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        if HAS_CUDA and "float64" in str(exc):
            pytest.skip(str(exc))
        raise


def triton_vs_reference(name, layout, n, d, dtype, tol, reduction="mean", seed=0, **extra):
    """The loss and gradients of the triton backend on ``dtype`` inputs against the float64
    reference on the same (rounded) inputs."""
    fn, kw = loss_case(name, layout)
    kw.update(extra)
    z1, z2 = make_pair(n, d, seed=seed, dtype=dtype)
    got = to_cpu(float64_may_be_unsupported(loss_and_grads, fn, *on_device(z1, z2),
                                            reduction=reduction, backend="triton", **kw))
    for t in got:
        assert t.dtype == dtype
    want = loss_and_grads(fn, z1.double(), z2.double(), reduction=reduction,
                          backend="reference", **kw)
    assert_same_results(got, want, tol)


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


def test_available_backends_reports_triton_usable():
    assert mk.available_backends(DEVICE)["triton"] is None
    if not HAS_CUDA:  # the CPU is usable exactly because the interpreter is on
        assert TF._INTERPRET
        assert mk.available_backends()["triton"] is None


def test_unavailable_reason_says_why():
    reason = TF.unavailable_reason(torch.device("meta"))
    assert isinstance(reason, str) and "CUDA" in reason


# --------------------------------------------------------------------------------------------
# The primitive itself against a dense autograd version, in float64 (exact to rounding)
# --------------------------------------------------------------------------------------------


def primitive_case(m, k, d, square, artanh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cand = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    inv_temp = 1 / (0.05 + torch.rand(m, generator=g, dtype=torch.float64))
    if square:
        anchors, self_index = None, torch.arange(m)
        pos_index = (torch.arange(m) + m // 2) % m
    else:
        anchors = torch.nn.functional.normalize(
            torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
        self_index, pos_index = None, torch.randperm(k, generator=g)[:m]
    cand, inv_temp = cand.to(dtype), inv_temp.to(dtype)
    args = (None if artanh else inv_temp, pos_index, self_index, 2.0 if artanh else None,
            1e-6 if artanh else 0.0)
    return anchors, cand, args


def run_primitive(fn, anchors, cand, args, square, **kwargs):
    """``lse_neg`` and the gradients of (anchors, candidates, inv_temp) that exist."""
    cand = cand.detach().clone().requires_grad_(True)
    leaves = [cand]
    if square:
        anchors = cand
    else:
        anchors = anchors.detach().clone().requires_grad_(True)
        leaves.insert(0, anchors)
    inv_temp = args[0]
    if inv_temp is not None:
        inv_temp = inv_temp.detach().clone().requires_grad_(True)
        leaves.append(inv_temp)
    out = fn(anchors, cand, inv_temp, *args[1:], **kwargs)
    return [out, *torch.autograd.grad(out, leaves, upstream_like(out))]


@pytest.mark.parametrize("artanh", [False, True], ids=["scaled", "artanh"])
@pytest.mark.parametrize("square,m,k,d", [
    (True, 14, 14, 7), (True, 40, 40, 20), (False, 10, 13, 33), (False, 2, 2, 1),
    (False, 37, 50, 16),
])
def test_primitive_matches_dense_float64(square, m, k, d, artanh):
    anchors, cand, args = primitive_case(m, k, d, square, artanh, torch.float64, seed=m + k + d)
    dev_args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    got = float64_may_be_unsupported(
        run_primitive, TF.negative_lse, *[None if t is None else t.to(DEVICE)
                                          for t in (anchors, cand)], dev_args, square)
    want = run_primitive(dense_negative_lse, anchors, cand, args, square)
    for i, (a, b) in enumerate(zip(to_cpu(got), want)):
        assert_rel_close(a, b, F64_RTOL, f"output {i}")


@pytest.mark.parametrize("artanh", [False, True], ids=["scaled", "artanh"])
def test_symmetric_path_matches_non_symmetric(artanh, monkeypatch):
    """Layout 2n: ``anchors is candidates`` takes the symmetric backward ((G + G^T) U in one
    pass); a distinct view of the same rows takes the general one. Both must agree."""
    _, U, args = primitive_case(40, 40, 20, True, artanh, torch.float32, seed=5)
    U = U.to(DEVICE)
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    seen = []
    original = TF._run_backward

    def spy(ops, *rest):
        seen.append(ops.symmetric)
        return original(ops, *rest)

    monkeypatch.setattr(TF, "_run_backward", spy)
    sym = run_primitive(TF.negative_lse, None, U, args, square=True)
    general = run_primitive(lambda a, c, *rest: TF.negative_lse(a, c.view_as(c), *rest),
                            None, U, args, square=True)
    assert seen == [True, False]
    for i, (a, b) in enumerate(zip(to_cpu(sym), to_cpu(general))):
        assert_rel_close(a, b, 1e-6, f"output {i}")


@pytest.mark.parametrize("name", ["macl_anchor", "tfree"])
def test_use_symmetry_switch_gives_the_same_losses(name, monkeypatch):
    """The loss-level 2n path with the symmetric backward on (default) and off (benchmarking)."""
    z1, z2 = make_pair(40, 32, seed=12, dtype=torch.float32)
    fn, kw = loss_case(name, "2n")
    sym = to_cpu(loss_and_grads(fn, *on_device(z1, z2), reduction="none", backend="triton", **kw))
    monkeypatch.setattr(TF, "USE_SYMMETRY", False)
    general = to_cpu(loss_and_grads(fn, *on_device(z1, z2), reduction="none", backend="triton",
                                    **kw))
    assert_same_results(sym, general, 1e-6)


# --------------------------------------------------------------------------------------------
# Every loss x layout x reduction, float32 against the float64 reference
# --------------------------------------------------------------------------------------------

SIZES = [(2, 7), (13, 32), (40, 7), (13, 7), (40, 32), (2, 32)]
LOSS_LAYOUT_REDUCTIONS = list(itertools.product(LOSS_LAYOUTS, REDUCTIONS))


@pytest.mark.parametrize("case", range(len(LOSS_LAYOUT_REDUCTIONS)),
                         ids=[f"{n}-{lay}-{r}" for (n, lay), r in LOSS_LAYOUT_REDUCTIONS])
def test_float32_vs_float64_reference(case):
    (name, layout), reduction = LOSS_LAYOUT_REDUCTIONS[case]
    n, d = SIZES[case % len(SIZES)]  # every size meets every layout, not every combination
    triton_vs_reference(name, layout, n, d, torch.float32, F32_RTOL, reduction, seed=case)


@pytest.mark.parametrize("name,layout", [("macl", "2n"), ("tfree", "cross"),
                                         ("dclw", "cross_sym"), ("clip", "cross_sym")])
def test_float64_vs_reference(name, layout):
    triton_vs_reference(name, layout, 13, 7, torch.float64, F64_RTOL, "none", seed=3)


HALF_CASES = [(name, layout, torch.bfloat16) for name, layout in LOSS_LAYOUTS] + [
    (name, layout, torch.float16) for name, layout in LOSS_LAYOUTS
    if layout == "2n" or name == "clip"]


@pytest.mark.parametrize("name,layout,dtype", HALF_CASES,
                         ids=[f"{n}-{lay}-{str(dt)[6:]}" for n, lay, dt in HALF_CASES])
def test_half_inputs_vs_float64_reference(name, layout, dtype):
    """Half inputs: GEMM operands rounded to the input dtype, fp32 statistics (SPEC: 2e-2)."""
    triton_vs_reference(name, layout, 24, 32, dtype, HALF_RTOL, "none", seed=11)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_RTOL), (torch.float64, F64_RTOL),
                                       (torch.bfloat16, HALF_RTOL)], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_clip_learnable_logit_scale_gradient(dtype, tol, reduction):
    z1, z2 = make_pair(13, 32, seed=7, dtype=dtype)
    scale = torch.tensor(1 / 0.07, dtype=torch.float32 if dtype != torch.float64 else dtype)
    got = float64_may_be_unsupported(loss_and_grads, mk.clip_loss, *on_device(z1, z2),
                                     logit_scale=scale.to(DEVICE), reduction=reduction,
                                     backend="triton")
    want = loss_and_grads(mk.clip_loss, z1.double(), z2.double(), logit_scale=scale.double(),
                          reduction=reduction, backend="reference")
    assert got[3].shape == ()
    assert_same_results(to_cpu(got), want, tol)


@pytest.mark.parametrize("layout", ["2n", "cross"])
@pytest.mark.parametrize("name", ["infonce", "macl"])
def test_float32_low_temperature(name, layout):
    """1/tau = 50: logits, LSE and accumulators stay accurate in float32."""
    triton_vs_reference(name, layout, 40, 32, torch.float32, F32_RTOL, "none", seed=2,
                        temperature=0.02)


# --------------------------------------------------------------------------------------------
# Hazards: S = +-1 under the artanh map, zero rows, determinism, bad dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["2n", "cross", "cross_sym"])
def test_tfree_duplicates_and_identical_views_give_finite_gradients(layout):
    """Exact duplicates (and the self pair) sit at S = 1, outside artanh's clamp: their slope is
    a finite 0, so the gradient is finite and matches the reference."""
    z1, z2 = make_pair(13, 7, seed=4, dtype=torch.float32)
    z1[5] = z1[2]
    z2[:4] = z1[:4]  # identical positives
    z2[9] = -z1[8]  # an antipodal pair, S = -1
    fn, kw = loss_case("tfree", layout)
    got = to_cpu(loss_and_grads(fn, *on_device(z1, z2), reduction="none", backend="triton", **kw))
    assert all(torch.isfinite(t).all() for t in got)
    want = loss_and_grads(fn, z1.double(), z2.double(), reduction="none", backend="reference",
                          **kw)
    # The loss of an identical positive pair is dominated by its clamped logit
    # 2 artanh(1 - 1e-6) ~ 14.5, computed by the functional layer in float32, where 1 - 1e-6 is
    # off by ~3e-8 and artanh's slope there is 5e5: ~1e-3 relative, the same for every backend.
    # So the loss is checked against the torch backend, the gradients against the reference.
    same_inputs = to_cpu(loss_and_grads(fn, z1, z2, reduction="none", backend="torch", **kw))
    assert_rel_close(got[0], same_inputs[0], F32_RTOL, "loss vs torch backend")
    assert_rel_close(got[0], want[0], 2e-3, "loss vs reference")
    assert_same_results(got[1:], want[1:], F32_RTOL, names=("dz1", "dz2"))


@pytest.mark.parametrize("layout", ["2n", "cross"])
def test_float16_large_weights_do_not_overflow(layout):
    """float16 operands: the artanh slope of a close negative (S ~ 0.95, slope ~20) times a
    loss scaler's upstream gradient (2^15 here) exceeds float16's 65504 inside the kernel's
    weight GEMMs; they run in tf32, so the gradients stay finite and accurate. (Large ``||z||``
    keeps the final ``dz = (I - u u^T) du / ||z||`` itself inside float16's range.)"""
    z1, z2 = make_pair(13, 32, seed=9, dtype=torch.float16, scale=1000.0)
    z1[5] = z1[2] + 0.3 * z1[7]  # S_{5,2} ~ 0.95, a negative in every layout
    fn, kw = loss_case("tfree", layout)
    results = []
    for x1, x2, backend in [(*on_device(z1, z2), "triton"),
                            (z1.double(), z2.double(), "reference")]:
        x1, x2 = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        loss = fn(x1, x2, reduction="sum", backend=backend, **kw)
        grads = torch.autograd.grad(loss, [x1, x2], torch.full_like(loss, 2.0 ** 15))
        results.append(to_cpu([loss, *grads]))
    got, want = results
    assert all(torch.isfinite(t).all() for t in got)
    assert_same_results(got, want, HALF_RTOL)


@pytest.mark.parametrize("name", ["macl", "tfree", "infonce"])
def test_zero_rows_are_finite(name):
    z1, z2 = make_pair(13, 7, seed=5, dtype=torch.float32)
    z1[3] = 0
    z2[7] = 0
    fn, kw = loss_case(name, "2n")
    got = to_cpu(loss_and_grads(fn, *on_device(z1, z2), backend="triton", **kw))
    assert all(torch.isfinite(t).all() for t in got)
    want = loss_and_grads(fn, z1.double(), z2.double(), backend="reference", **kw)
    assert_same_results(got, want, F32_RTOL)


@pytest.mark.parametrize("layout", ["2n", "cross"])
def test_deterministic(layout):
    """Column-ordered backward, no atomics: bitwise identical results run to run."""
    z1, z2 = make_pair(40, 32, seed=6, dtype=torch.float32)
    fn, kw = loss_case("macl", layout)
    runs = [to_cpu(loss_and_grads(fn, *on_device(z1, z2), backend="triton", **kw))
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_primitive_rejects_half_compute_dtype_and_huge_d():
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).to(DEVICE)
    idx = torch.tensor([2, 3, 0, 1], device=DEVICE)
    with pytest.raises(TypeError, match="float32 or float64"):
        TF.negative_lse(x.half(), x.half(), torch.ones(4, device=DEVICE).half(), idx, None,
                        None, 0.0)
    wide = torch.zeros(4, TF.MAX_D + 1, device=DEVICE)
    with pytest.raises(ValueError, match="backend='torch'"):
        TF.negative_lse(wide, wide, torch.ones(4, device=DEVICE), idx, None, None, 0.0)


def test_inputs_are_not_mutated():
    z1, z2 = on_device(*make_pair(13, 7, seed=8, dtype=torch.float32))
    before = (z1.clone(), z2.clone())
    fn, kw = loss_case("macl", "2n")
    loss_and_grads(fn, z1, z2, backend="triton", **kw)
    assert torch.equal(z1, before[0]) and torch.equal(z2, before[1])


# --------------------------------------------------------------------------------------------
# The compiled (non-interpreted) kernels, built for an H100 without one
# --------------------------------------------------------------------------------------------

COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from macl_kernels.backends import triton_fused as TF

POINTERS = {"A", "C", "B", "POS", "SELF", "LSE", "E", "G", "DC", "DB"}

def build(kernel, op, consts, warps, stages):
    acc = "fp64" if op == "fp64" else "fp32"
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*i32" if name in ("POS", "SELF") else "*" + (op if name in "AC" else acc)
        else:
            sig[name] = "fp32" if name.startswith("artanh") else "i32"
    return triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))

common = dict(HAS_SELF=True, DOT_PRECISION="ieee", UPCAST=False)
# (operands, artanh map, BLOCK_D, shape, backward variants (symmetric?) to build)
for op, artanh, bd, (bm, bn, warps, stages), backward in [
        ("bf16", False, 128, (64, 64, 4, 2), (False, True)),
        ("fp16", True, 128, (64, 64, 8, 2), (False,)),
        ("fp32", True, 512, (32, 32, 8, 1), (True,)),
        ("fp64", False, 32, (32, 32, 4, 1), ())]:
    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ARTANH=artanh, **common)
    build(TF._forward_kernel, op, dict(ACC_E=True, G_WIDE=op == "fp16" and artanh, **blocks),
          warps, stages)
    for sym in backward:
        build(TF._candidates_kernel, op, dict(SYMMETRIC=sym, NEED_DB=sym and not artanh,
                                              G_WIDE=op == "fp16", **blocks), warps, stages)
print("compiled")
"""


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run the compiled kernels for real")
def test_kernels_compile_for_h100_without_a_gpu(tmp_path):
    """Triton's interpreter checks the math but not the compiled path's typing, layouts or
    resource use. Compile both kernels (TTIR -> PTX -> cubin with Triton's bundled ptxas) for
    sm_90 in a subprocess without TRITON_INTERPRET: bf16 (both backward variants), fp16 (tf32
    weight GEMMs), fp32 at D = 512 (symmetric backward) and fp64."""
    import os
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; the default anyway
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# GPU: real sizes, half precisions, tf32, memory
# --------------------------------------------------------------------------------------------

GPU_PRECISIONS = [(torch.float32, F32_RTOL), (torch.bfloat16, HALF_RTOL),
                  (torch.float16, HALF_RTOL)]


# Every loss and layout in fp32 (D = 128) and bf16 (D = 256); fp16 and D = 512 on layout 2n and CLIP.
GPU_CASES = (
    [(n, lay, torch.float32, F32_RTOL, 128) for n, lay in LOSS_LAYOUTS]
    + [(n, lay, torch.bfloat16, HALF_RTOL, 256) for n, lay in LOSS_LAYOUTS]
    + [(n, lay, dt, tol, 512) for n, lay in LOSS_LAYOUTS if lay == "2n" or n == "clip"
       for dt, tol in GPU_PRECISIONS]
    + [(n, lay, torch.float16, HALF_RTOL, 128) for n, lay in LOSS_LAYOUTS
       if lay == "2n" or n == "clip"]
)


@gpu
@pytest.mark.parametrize("name,layout,dtype,tol,d", GPU_CASES,
                         ids=[f"{n}-{lay}-{str(dt)[6:]}-D{d}" for n, lay, dt, _, d in GPU_CASES])
def test_gpu_real_sizes(name, layout, dtype, tol, d):
    n = 1000 if d < 512 else 600  # not a multiple of any tile
    fn, kw = loss_case(name, layout)
    z1, z2 = make_pair(n, d, seed=d, dtype=dtype)
    got = to_cpu(loss_and_grads(fn, z1.cuda(), z2.cuda(), reduction="none", backend="triton",
                                **kw))
    want = to_cpu(loss_and_grads(fn, z1.cuda().double(), z2.cuda().double(), reduction="none",
                                 backend="reference", **kw))
    assert_same_results(got, want, tol)


def test_tile_shapes_fit_every_width():
    """The GPU shape rules (pure Python, checked everywhere): every D up to MAX_D gets a shape,
    and the autotuner's pruning never leaves it empty."""
    for d in (1, 7, 64, 128, 200, 256, 512, TF.MAX_D):
        block_d = max(16, 1 << (d - 1).bit_length())
        for elem in (2, 4, 8):
            for cand in (False, True):
                bm, bn, warps, stages = TF._default_shape(block_d, elem, cand)
                assert bm >= 16 and bn >= 16 and warps in (4, 8)
                named = {"A": torch.empty(0, dtype={2: torch.bfloat16, 4: torch.float32,
                                                    8: torch.float64}[elem])}
                if cand:
                    named["DC"] = None
                kept = TF._prune(TF._gpu_configs(), named, BLOCK_D=block_d)
                assert kept
                if block_d <= 256 and elem <= 4:
                    assert TF._fits((bm, bn, warps, stages), block_d, elem, cand)


@gpu
@pytest.mark.parametrize("name,layout", [("macl", "2n"), ("clip", "cross_sym")])
def test_gpu_autotuned_path(name, layout, monkeypatch):
    monkeypatch.setattr(TF, "AUTOTUNE", True)
    triton_vs_reference(name, layout, 1000, 128, torch.bfloat16, HALF_RTOL, "none", seed=4)


@gpu
@pytest.mark.parametrize("name,layout", [("macl", "2n"), ("clip", "cross_sym")])
def test_gpu_tf32(name, layout):
    """fp32 operands on tf32 tensor cores when the user allows it (SPEC: 1e-3)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        fn, kw = loss_case(name, layout)
        z1, z2 = make_pair(1000, 256, seed=1, dtype=torch.float32)
        got = to_cpu(loss_and_grads(fn, z1.cuda(), z2.cuda(), backend="triton", **kw))
    finally:
        torch.set_float32_matmul_precision(previous)
    want = loss_and_grads(fn, z1.double(), z2.double(), backend="reference", **kw)
    assert_same_results(got, want, 1e-3)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,layout", [("macl", "2n"), ("clip", "cross_sym")])
def test_gpu_peak_memory_is_linear(name, layout, dtype):
    """N = 32768, D = 256: the M x K matrix alone would take M * K * 4 bytes (16 GiB for 2n);
    the kernels' extra memory is a few (M + K) x D buffers."""
    n, d = 32768, 256
    fn, kw = loss_case(name, layout)
    z1, z2 = (torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fn(z1, z2, backend="triton", **kw)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    m = k = 2 * n if layout == "2n" else n
    rows_bytes = (m + k) * d * 4
    assert torch.isfinite(loss).item()
    assert extra < 12 * rows_bytes, (extra, rows_bytes)
    assert extra < m * k * 4 / 50, (extra, m * k * 4)
