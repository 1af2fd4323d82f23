"""The Triton backend: what is specific to it. Its primitive is tested with every other backend's in
test_primitive.py (under Triton's CPU interpreter without a GPU: ``TRITON_INTERPRET=1``, set by
conftest.py before macl_kernels' Triton module is imported) and its losses in test_losses.py.
Here: availability, the symmetric backward switch, half-precision operand handling, the
compiled (non-interpreted) kernels built for sm_90 without a GPU, the GPU tile-shape rules, and
with a GPU real sizes, tf32, autotuning and the O((M + K) D) memory promise.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton): the triton "
                                     "backend cannot be tested")

import macl_kernels as mk  # noqa: E402
from conftest import (  # noqa: E402
    F32_RTOL, F64_RTOL, HALF_RTOL, LOSS_LAYOUTS, assert_rel_close, assert_same_results,
    loss_and_grads, loss_case, make_pair, tolerance,
)
from macl_kernels.primitive import ops as _ops  # noqa: E402
from macl_kernels.primitive.protocol import LogitMap  # noqa: E402
from macl_kernels.primitive.backends import triton as TF  # noqa: E402
# The layers whose switches and functions the tests set or spy on.
from macl_kernels.primitive.backends.triton import backend as TB  # noqa: E402
from macl_kernels.primitive.backends.triton import config as TC  # noqa: E402
from macl_kernels.primitive.backends.triton import launch as TL  # noqa: E402

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
    monkeypatch.setattr(TC, "AUTOTUNE", False)
    # Under the interpreter: tl.dot's minimum tile, so that N = 13 spans two ragged tiles in both
    # directions (N = 40: three).
    monkeypatch.setattr(TC, "INTERPRETER_BLOCK_M", 16)
    monkeypatch.setattr(TC, "INTERPRETER_BLOCK_N", 16)


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
        assert TF.INTERPRET
        assert mk.available_backends()["triton"] is None


def test_unavailable_reason_says_why():
    reason = TF.unavailable_reason(torch.device("meta"))
    assert isinstance(reason, str) and "CUDA" in reason


def _symmetric_problem(m=40, d=20, seed=5):
    g = torch.Generator().manual_seed(seed)
    U = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(DEVICE)
    inv_temp = (1 / (0.05 + torch.rand(m, generator=g))).to(DEVICE)
    pos_index = ((torch.arange(m) + m // 2) % m).to(DEVICE)
    return U, inv_temp, pos_index, torch.arange(m, device=DEVICE)


@pytest.mark.parametrize("use_symmetry", [True, False])
def test_symmetric_backward_is_taken_when_switched_on(use_symmetry, monkeypatch):
    """``candidates=None`` takes the symmetric backward ((dL_dS + dL_dS^T) U in one pass, no
    anchor-side accumulator E from forward) exactly when USE_SYMMETRY is on; both give the same
    numbers (test_primitive.py compares either with a copy of the rows as candidates)."""
    monkeypatch.setattr(TC, "USE_SYMMETRY", use_symmetry)
    seen = []
    original = TB._run_backward

    def spy(problem, lse_neg, E, g, needs):
        seen.append((problem.symmetric, E is None))
        return original(problem, lse_neg, E, g, needs)

    monkeypatch.setattr(TB, "_run_backward", spy)
    U, inv_temp, pos_index, self_index = _symmetric_problem()
    U.requires_grad_(True)
    out = _ops.negative_lse("triton", U, None, inv_temp, pos_index, self_index)
    out.sum().backward()
    assert seen == [(True, use_symmetry)]
    assert torch.isfinite(U.grad).all()


def test_rejects_too_wide_embeddings():
    """Whole rows live in a tile: D above MAX_D is refused, naming the way out."""
    wide = torch.zeros(4, TF.MAX_D + 1, device=DEVICE)
    idx = torch.tensor([2, 3, 0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="backend='torch'"):
        _ops.negative_lse("triton", wide, None, torch.ones(4, device=DEVICE), idx, None)


@pytest.mark.parametrize("operand_dtype", [torch.bfloat16, torch.float16])
def test_half_operand_dtype(operand_dtype):
    """``operand_dtype``: float32 statistics over GEMM operands rounded to half precision; equal
    to the primitive on the rounded rows (to float32 accuracy)."""
    U, inv_temp, pos_index, self_index = _symmetric_problem(m=24, d=16, seed=7)
    got = _ops.negative_lse("triton", U, None, inv_temp, pos_index, self_index,
                            LogitMap.SCALED, operand_dtype=operand_dtype)
    rounded = U.to(operand_dtype).float()
    want = _ops.negative_lse("triton", rounded, None, inv_temp, pos_index, self_index)
    assert_rel_close(got.cpu(), want.cpu(), F32_RTOL, "lse_neg")


@pytest.mark.parametrize("name", ["macl_anchor", "tfree"])
def test_use_symmetry_switch_gives_the_same_losses(name, monkeypatch):
    """The loss-level 2n path with the symmetric backward on (default) and off (benchmarking)."""
    z1, z2 = make_pair(40, 32, seed=12, dtype=torch.float32)
    fn, kw = loss_case(name, "2n")
    sym = to_cpu(loss_and_grads(fn, *on_device(z1, z2), reduction="none", backend="triton", **kw))
    monkeypatch.setattr(TC, "USE_SYMMETRY", False)
    general = to_cpu(loss_and_grads(fn, *on_device(z1, z2), reduction="none", backend="triton",
                                    **kw))
    assert_same_results(sym, general, 1e-6)


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


# --------------------------------------------------------------------------------------------
# The compiled (non-interpreted) kernels, built for an H100 without one
# --------------------------------------------------------------------------------------------

COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from macl_kernels.tools import inventory as I
from macl_kernels.primitive.backends import triton as TF

def build(name, precision, block_d, shape, **flags):
    # Through the kernel table, with the inventory's signature (index pointers int32, label
    # pointers int64, the rest of the operand or compute dtype) and the precision's dot.
    spec = TF.KERNELS[name]
    bm, bn, warps, stages = shape
    consts = dict(HAS_SELF=True, DOT_PRECISION=TF.PRECISIONS[precision][2], UPCAST=False,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **flags)
    consts = {k: v for k, v in consts.items() if k in spec.function.arg_names}
    sig, attrs = I._signature(spec, precision, consts)
    return triton.compile(ASTSource(spec.function, sig, consts, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))

SCALED, ARTANH = 0, 1
shape = (64, 64, 4, 2)
# bf16: the label mask (forward, both backward variants), both directions, SigLIP's softplus.
build("forward", "bf16", 128, shape, LOGIT_MAP=SCALED, ACC_E=True, HAS_LABELS=True,
      WIDE_WEIGHTS=False)
for sym in (False, True):
    build("candidates", "bf16", 128, shape, LOGIT_MAP=SCALED, MIRRORED=sym,
          NEED_D_INV_TEMP=sym, HAS_LABELS=True, WIDE_WEIGHTS=False)
build("both_forward", "bf16", 128, shape, LOGIT_MAP=SCALED)
build("both_backward", "bf16", 128, shape, LOGIT_MAP=SCALED, MIRRORED=True, HAS_LABELS=False,
      NEED_D_INV_TEMP=True, WIDE_WEIGHTS=False)
build("softplus_forward", "bf16", 128, shape, HAS_BIAS=True, ACC_E=True)
build("softplus_candidates", "bf16", 128, shape, HAS_BIAS=True, WIDE_WEIGHTS=False)
# fp16: the ARTANH map with the tf32 weight GEMMs.
build("forward", "fp16", 128, (64, 64, 8, 2), LOGIT_MAP=ARTANH, ACC_E=True, HAS_LABELS=False,
      WIDE_WEIGHTS=True)
build("both_backward", "fp16", 128, (64, 64, 8, 2), LOGIT_MAP=ARTANH, MIRRORED=True,
      HAS_LABELS=False, NEED_D_INV_TEMP=False, WIDE_WEIGHTS=True)
# fp32 (3xTF32) at its widest width, the symmetric backward; fp64.
build("candidates", "fp32", 128, (32, 32, 4, 2), LOGIT_MAP=ARTANH, MIRRORED=True,
      NEED_D_INV_TEMP=False, HAS_LABELS=False, WIDE_WEIGHTS=False)
build("forward", "fp64", 32, (32, 32, 4, 1), LOGIT_MAP=SCALED, ACC_E=True, HAS_LABELS=True,
      WIDE_WEIGHTS=False)
build("both_forward", "fp64", 32, (32, 32, 4, 1), LOGIT_MAP=ARTANH)
build("softplus_forward", "fp64", 32, (32, 32, 4, 1), HAS_BIAS=False, ACC_E=True)
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run the compiled kernels for real")
def test_kernels_compile_for_h100_without_a_gpu(tmp_path):
    """Triton's interpreter checks the math but not the compiled path's typing, layouts or
    resource use. Compile the kernels of the table (TTIR -> PTX -> cubin with Triton's bundled
    ptxas) for sm_90 in a subprocess without TRITON_INTERPRET: bf16 with labels (both backward
    variants), both directions and softplus, fp16 (tf32 weight GEMMs), fp32 3xTF32 at D = 128
    (symmetric backward) and fp64. The resource rules: tests/test_kernel_inventory.py."""
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


# Every loss and layout in fp32 (D = 128) and bf16 (D = 256); fp16 and D = 512 on layout 2n and CLIP
# (half precisions only: float32 at the default matmul precision stops at D = 128 on a GPU,
# test_gpu_smoke.py checks the refusal and runs tf32 at D = 512; test_gpu_tf32 at D = 256).
GPU_CASES = (
    [(n, lay, torch.float32, F32_RTOL, 128) for n, lay in LOSS_LAYOUTS]
    + [(n, lay, torch.bfloat16, HALF_RTOL, 256) for n, lay in LOSS_LAYOUTS]
    + [(n, lay, dt, tol, 512) for n, lay in LOSS_LAYOUTS if lay == "2n" or n == "clip"
       for dt, tol in GPU_PRECISIONS if dt != torch.float32]
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


def test_autotune_space_is_pruned_to_the_measured_shapes():
    """The GPU shape rules (pure Python, checked everywhere; the tables themselves in
    test_kernel_inventory.py): the autotuner's space, pruned for a call, is exactly the shape
    table's list for that kernel kind, precision and width."""
    for name, kind in (("forward", "forward"), ("candidates", "candidates")):
        tuned = TL.tuned_kernel(name)
        for dtype, dot, precision in ((torch.bfloat16, "ieee", "bf16"),
                                      (torch.float32, "tf32x3", "fp32"),
                                      (torch.float32, "tf32", "fp32-tf32"),
                                      (torch.float64, "ieee", "fp64")):
            for block_d in (16, 128, 256, 512, 1024):
                named = {"anchors_ptr": torch.empty(0, dtype=dtype), "DOT_PRECISION": dot}
                kept = tuned.early_config_prune(tuned.configs, named, BLOCK_D=block_d)
                got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                       for c in kept}
                assert got == set(TF.shape_candidates(kind, precision, block_d)), \
                    (name, precision, block_d)


@gpu
@pytest.mark.parametrize("name,layout", [("macl", "2n"), ("clip", "cross_sym")])
def test_gpu_autotuned_path(name, layout, monkeypatch):
    monkeypatch.setattr(TC, "AUTOTUNE", True)
    triton_vs_reference(name, layout, 1000, 128, torch.bfloat16, HALF_RTOL, "none", seed=4)


@gpu
@pytest.mark.parametrize("name,layout", [("macl", "2n"), ("clip", "cross_sym")])
def test_gpu_tf32(name, layout):
    """fp32 operands on tf32 tensor cores when the user allows it (docs/math.md#tolerances:
    1e-3, ``_cases.tolerance("triton", "float32")``)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        fn, kw = loss_case(name, layout)
        z1, z2 = make_pair(1000, 256, seed=1, dtype=torch.float32)
        got = to_cpu(loss_and_grads(fn, z1.cuda(), z2.cuda(), backend="triton", **kw))
    finally:
        torch.set_float32_matmul_precision(previous)
    want = loss_and_grads(fn, z1.double(), z2.double(), backend="reference", **kw)
    assert_same_results(got, want, tolerance("triton", "float32"))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,layout", [("macl", "2n"), ("clip", "cross_sym")])
def test_gpu_peak_memory_is_linear(name, layout, dtype):
    """N = 32768, D = 256 (128 in float32, its widest on a GPU): the M x K matrix alone would
    take M * K * 4 bytes (16 GiB for 2n); the kernels' extra memory is a few (M + K) x D
    buffers."""
    n, d = 32768, (128 if dtype == torch.float32 else 256)
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
