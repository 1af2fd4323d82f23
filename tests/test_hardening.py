"""Hardening of the losses: torch.compile (custom ops, no graph break), autocast, numerical edge
cases, determinism, on every backend that runs on this machine's CPU. The op itself (opcheck,
torch.compile of the primitive, its sentinels) is tested in test_primitive.py; property-based
tests live in test_properties.py."""

from __future__ import annotations

import math

import pytest
import torch

import macl_kernels as mk
from conftest import (
    F32_RTOL, F64_RTOL, HALF_RTOL, LOSS_CASES, heavy_on_interpreter, LOSS_LAYOUTS, assert_rel_close, rel_err,
    assert_same_results, loss_and_grads, loss_case, make_pair,
)
from macl_kernels.primitive import ops as _ops
from macl_kernels.primitive.protocol import Backend
from macl_kernels.primitive.backends import kernel_backend

# The kernel backends usable on CPU tensors here (Triton runs in its interpreter: keep its sizes
# small).
KERNEL_BACKENDS = [b for b in ("torch", "cpu", "triton")
                   if mk.available_backends("cpu")[b] is None]
ALL_BACKENDS = ["reference", *KERNEL_BACKENDS]


def test_every_cpu_kernel_backend_is_tested_here():
    assert {"torch", "cpu"} <= set(KERNEL_BACKENDS)


# --------------------------------------------------------------------------------------------
# torch.compile: the kernels are custom ops with fake implementations and registered autograd
# --------------------------------------------------------------------------------------------


def _all_losses(z1, z2, backend):
    """Every public loss and layout in one function: one compilation covers them all."""
    total = 0
    for name, layout in LOSS_LAYOUTS:
        fn, kw = loss_case(name, layout)
        total = total + fn(z1, z2, backend=backend, **kw)
    return total


@pytest.mark.slow  # Dynamo + AOT over every loss: 40-60 s per backend on 2 cores
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    """Dynamo captures every loss with no graph break (fullgraph=True raises on one), the fake
    implementations give the right shapes, and forward and backward match eager. aot_eager runs
    the captured joint graph without code generation, which keeps this fast."""
    torch._dynamo.reset()
    z1, z2 = make_pair(6, 5, seed=3, dtype=torch.float32)
    compiled = torch.compile(_all_losses, fullgraph=True, backend="aot_eager", dynamic=False)
    got = loss_and_grads(lambda a, b: compiled(a, b, backend), z1, z2)
    want = loss_and_grads(lambda a, b: _all_losses(a, b, backend), z1, z2)
    assert_same_results(got, want, 1e-6)


@pytest.mark.slow  # inductor generates and compiles C++: ~15 s
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compile_inductor_macl_matches_eager(backend):
    """The default backend (inductor, which generates C++ for the surrounding ops)."""
    torch._dynamo.reset()
    z1, z2 = make_pair(9, 7, seed=4, dtype=torch.float32)

    def step(a, b):
        return mk.macl_loss(a, b, backend=backend, temperature_mode="anchor")

    compiled = torch.compile(step, fullgraph=True)
    assert_same_results(loss_and_grads(compiled, z1, z2), loss_and_grads(step, z1, z2), 1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_are_custom_ops(backend, monkeypatch):
    """Every kernel backend is a ``Backend`` behind the one custom op: the losses reach it only
    through ``macl_kernels::negative_lse`` (else torch.compile graphs would break)."""
    assert isinstance(kernel_backend(backend), Backend)
    assert hasattr(torch.ops.macl_kernels, "negative_lse")
    calls = []
    original = _ops.negative_lse_op

    def spy(name, *args):
        calls.append(name)
        return original(name, *args)

    monkeypatch.setattr(_ops, "negative_lse_op", spy)
    z1, z2 = make_pair(6, 4, seed=1)
    mk.macl_loss(z1, z2, backend=backend)
    assert calls and set(calls) == {backend}


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", heavy_on_interpreter(ALL_BACKENDS))
def test_cpu_autocast_bf16(backend):
    """Under CPU autocast the embeddings arrive in bfloat16: the loss computes in float32
    (autocast is turned off inside it), returns bfloat16, and gradients flow back in bfloat16."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 24)
    x1, x2 = torch.randn(20, 12), torch.randn(20, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = lin(x1), lin(x2)
        z1.retain_grad()
        loss = mk.macl_loss(z1, z2, backend=backend)
    assert z1.dtype == loss.dtype == torch.bfloat16
    loss.backward()
    assert z1.grad.dtype == torch.bfloat16
    # Against the float64 reference on the same bfloat16 embeddings.
    want = loss_and_grads(mk.macl_loss, z1.detach().double(), z2.detach().double(),
                          backend="reference")
    got = loss_and_grads(mk.macl_loss, z1.detach(), z2.detach(), backend=backend)
    assert_same_results(got, want, HALF_RTOL)
    assert_rel_close(loss, want[0], HALF_RTOL, "loss under autocast")


def test_autocast_does_not_lower_float32_similarity():
    """float32 embeddings under autocast: the loss must equal the float32 loss outside autocast
    (autocast would otherwise round the similarity GEMM to bfloat16)."""
    z1, z2 = make_pair(16, 8, seed=2, dtype=torch.float32)
    for backend in ALL_BACKENDS:
        plain = mk.infonce_loss(z1, z2, backend=backend, temperature=0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = mk.infonce_loss(z1, z2, backend=backend, temperature=0.05)
        assert under.dtype == torch.float32
        assert_rel_close(under, plain, 1e-6, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_inside_autocast_region(backend):
    """``loss.backward()`` called inside the autocast region (a common training-loop shape): the
    kernels' backward runs with autocast off like their forward, so float32 embeddings get the
    same gradients as outside autocast (the torch backend used to fail here on a bf16 x fp32
    matmul)."""
    z1, z2 = make_pair(16, 8, seed=3, dtype=torch.float32)
    want = loss_and_grads(mk.macl_loss, z1, z2, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(mk.macl_loss, z1, z2, backend=backend)
    assert_same_results(got, want, 1e-6)


# --------------------------------------------------------------------------------------------
# Numerical edge cases, every backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
@pytest.mark.parametrize("layout", ["2n", "cross", "cross_sym"])
def test_near_duplicate_positives_macl(backend, layout):
    """Positives almost identical to their anchors: P_ap -> 1 and 1 - P_ap cancels. The MACL
    per-anchor loss sg(V) (-log P) = (1 + e^-x) softplus(x) stays >= 1, and the gradient is exact."""
    z1, _ = make_pair(12, 16, seed=8)
    z2 = z1 + 1e-9 * torch.randn(z1.shape, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64)
    per_anchor = mk.macl_loss(z1, z2, layout=layout, reduction="none", backend=backend,
                              temperature=0.05)
    assert bool((per_anchor >= 1 - 1e-12).all()), per_anchor.min()
    got = loss_and_grads(mk.macl_loss, z1, z2, layout=layout, backend=backend, temperature=0.05)
    want = loss_and_grads(mk.macl_loss, z1, z2, layout=layout, backend="reference",
                          temperature=0.05)
    assert_same_results(got, want, F64_RTOL)


@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_RTOL), (torch.bfloat16, HALF_RTOL)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["infonce", "macl", "dcl"])
def test_temperature_0_005(backend, dtype, tol, name):
    fn, kw = loss_case(name, "2n")
    kw["temperature"] = 0.005
    z1, z2 = make_pair(10, 8, seed=5, dtype=dtype)
    got = loss_and_grads(fn, z1, z2, backend=backend, **kw)
    want = loss_and_grads(fn, z1.double(), z2.double(), backend="reference", **kw)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    assert_same_results(got, want, tol)


@pytest.mark.parametrize("backend", heavy_on_interpreter(ALL_BACKENDS))
@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_zero_rows_follow_pytorch_normalisation(backend, name):
    """A zero embedding normalises to zero (F.normalize's eps): finite loss and gradients that
    match the reference, which is plain autograd through F.normalize."""
    fn, kw = loss_case(name, "2n")
    z1, z2 = make_pair(6, 4, seed=6)
    z1[2] = 0.0
    z2[4] = 0.0
    got = loss_and_grads(fn, z1, z2, backend=backend, **kw)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    want = loss_and_grads(fn, z1, z2, backend="reference", **kw)
    assert_same_results(got, want, F64_RTOL)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_equal_embeddings_closed_forms(backend):
    """Every similarity equal (docs/math.md#tolerances): NT-Xent log(2N-1), cross log N, DCL log(2N-2),
    MACL (2N-1)/(2N-2) log(2N-1)."""
    n = 5
    z = torch.ones(n, 3, dtype=torch.float64)
    assert mk.infonce_loss(z, z, backend=backend).item() == pytest.approx(math.log(2 * n - 1),
                                                                           rel=1e-12)
    assert mk.infonce_loss(z, z, layout="cross", backend=backend).item() == pytest.approx(
        math.log(n), rel=1e-12)
    assert mk.dcl_loss(z, z, backend=backend).item() == pytest.approx(
        math.log(2 * n - 2), rel=1e-12)
    assert mk.macl_loss(z, z, backend=backend).item() == pytest.approx(
        (2 * n - 1) / (2 * n - 2) * math.log(2 * n - 1), rel=1e-12)


@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
@pytest.mark.parametrize("n,d", [(2, 1), (2, 3), (6, 1),
                                 pytest.param(4, 4096, marks=pytest.mark.slow)])  # ~5 s each
def test_extreme_shapes(backend, n, d):
    from macl_kernels.primitive.backends import resolve_backend

    max_d = kernel_backend(backend).capabilities.max_d
    if max_d is not None and d > max_d:
        # A documented cap of the Triton kernels (whole rows live in a tile): an explicit request
        # fails clearly, and auto passes over the backend.
        z1, z2 = make_pair(n, d, seed=0)
        with pytest.raises(ValueError, match=f"D <= {max_d}"):
            mk.macl_loss(z1, z2, backend=backend)
        assert resolve_backend("auto", torch.device("cuda"), d) != backend
        return
    for name, layout in LOSS_LAYOUTS:
        fn, kw = loss_case(name, layout)
        z1, z2 = make_pair(n, d, seed=n + d)
        got = loss_and_grads(fn, z1, z2, backend=backend, **kw)
        want = loss_and_grads(fn, z1, z2, backend="reference", **kw)
        assert all(bool(torch.isfinite(t).all()) for t in got)
        if d == 1:  # normalised D = 1 rows are +-1: the input gradient is identically zero
            assert_rel_close(got[0], want[0], F64_RTOL, f"{name}/{layout} loss")
            for g in got[1:3]:
                assert float(g.abs().max()) < 1e-12
        else:
            assert_same_results(got, want, F64_RTOL)


@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
def test_strided_inputs_match_contiguous(backend):
    base1, base2 = make_pair(14, 18, seed=7)
    z1 = base1.T.contiguous().T[::2, ::3]  # column-major storage, then strided rows and columns
    z2 = base2[::2, ::3]
    assert not z1.is_contiguous() and not z2.is_contiguous()
    for name, layout in LOSS_LAYOUTS:
        fn, kw = loss_case(name, layout)
        got = loss_and_grads(fn, z1, z2, backend=backend, **kw)
        want = loss_and_grads(fn, z1.contiguous(), z2.contiguous(), backend=backend, **kw)
        assert_same_results(got, want, 1e-14)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inputs_without_grad_do_no_backward_work(backend, monkeypatch):
    impl = kernel_backend(backend)
    calls = []
    original = impl.bwd
    monkeypatch.setattr(impl, "bwd", lambda *a, **k: calls.append(1) or original(*a, **k))
    z1, z2 = make_pair(6, 4, seed=1)
    loss = mk.macl_loss(z1, z2, backend=backend)
    assert not loss.requires_grad
    z1.requires_grad_(True)
    mk.macl_loss(z1, z2, backend=backend).backward()
    assert calls, "the spy saw no backward: the check would be vacuous"


@pytest.mark.parametrize("backend", heavy_on_interpreter(ALL_BACKENDS))
def test_gradient_accumulation_over_micro_batches(backend):
    """Two micro-batches' losses back-propagated one after the other accumulate into .grad
    exactly as PyTorch does for any loss: the sum of the two separate gradients."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 8).double()
    batches = [torch.randn(10, 6, dtype=torch.float64) for _ in range(4)]
    for a, b in ((0, 1), (2, 3)):
        mk.macl_loss(lin(batches[a]), lin(batches[b]), backend=backend).backward()
    accumulated = lin.weight.grad.clone()
    separate = []
    for a, b in ((0, 1), (2, 3)):
        lin.zero_grad()
        mk.macl_loss(lin(batches[a]), lin(batches[b]), backend="reference").backward()
        separate.append(lin.weight.grad.clone())
    assert_rel_close(accumulated, separate[0] + separate[1], F64_RTOL, "accumulated grad")


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
def test_bitwise_deterministic(backend):
    runs = []
    for _ in range(2):
        # 2N = 40 rows: two of Triton's interpreter tiles (32); cpu tiles: test_cpu_backend.py.
        z1, z2 = make_pair(20, 12, seed=9, dtype=torch.float32)
        runs.append([loss_and_grads(fn, z1, z2, backend=backend, **kw)
                     for fn, kw in (loss_case(n, l) for n, l in LOSS_LAYOUTS)])
    for first, second in zip(*runs):
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
def test_runs_under_torch_deterministic_algorithms(backend):
    """No backend uses an op that PyTorch flags as non-deterministic."""
    z1, z2 = make_pair(8, 4, seed=2)
    torch.use_deterministic_algorithms(True)
    try:
        loss_and_grads(mk.macl_loss, z1, z2, backend=backend)
        loss_and_grads(mk.clip_loss, z1, z2, backend=backend,
                       logit_scale=torch.tensor(10.0, dtype=torch.float64))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", heavy_on_interpreter(ALL_BACKENDS))
def test_macl_when_p_positive_rounds_to_one(backend, dtype):
    """Found by the property tests: at 1/tau = 1000 the positive's probability is 1 in floating
    point, V = 1/(1 - P) overflows and -log P underflows. The loss is then 1 per anchor (its
    limit) with gradient sg(V) sigmoid(x) = 1 in x: never inf * 0 = NaN, in the reference too."""
    z1 = torch.tensor([[1.5302, -0.3074], [-2.1748, 0.5768]], dtype=dtype)
    z2 = torch.tensor([[1.5338, -0.2975], [-2.1848, 0.5703]], dtype=dtype)
    kw = dict(temperature=0.03125, alpha=0.0625, schedule="exp")  # tau hits its 1e-3 floor
    got = loss_and_grads(mk.macl_loss, z1, z2, backend=backend, reduction="none", **kw)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    assert torch.allclose(got[0], torch.ones_like(got[0]))
    want = loss_and_grads(mk.macl_loss, z1.double(), z2.double(), backend="reference",
                          reduction="none", **kw)
    if dtype == torch.float64:
        assert_same_results(got, want, F64_RTOL)
        return
    # 1/tau = 1000 amplifies float32 rounding a hundredfold beyond the ordinary temperatures of
    # docs/math.md#tolerances:
    # the float32 reference itself lands ~1.2e-5 from float64 here. A kernel must do as well as
    # float32 arithmetic can: within twice the float32 reference's own error (or 1e-5).
    fp32_ref = loss_and_grads(mk.macl_loss, z1, z2, backend="reference", reduction="none", **kw)
    for name, a, r, b in zip(("loss", "dz1", "dz2"), got, fp32_ref, want):
        assert_rel_close(a, b, max(F32_RTOL, 2 * rel_err(r, b)), name)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_fused_normalisation_backward_matches_autograd(dtype, tol):
    """The fast path's L2 normalisation (_math._RowNormalize, docs/math.md#reductions-and-
    normalisation): F.normalize's forward bit for bit, and autograd's gradient of it - rows of
    zeros, below the 1e-12 clamp, exactly at it, huge, and with a NaN (which stays NaN) - while
    a second derivative raises instead of returning a wrong one."""
    from macl_kernels import _math

    g = torch.Generator().manual_seed(5)
    z = torch.randn(64, 9, generator=g, dtype=dtype)
    z[1] = 0.0
    z[2] *= 1e-14
    z[3] = 0.0
    z[3, 0] = 1e-12  # ||z|| == eps: PyTorch's clamp_min passes the gradient at equality
    z[4] *= 1e20
    z[5, 3] = float("nan")
    up = torch.randn(z.shape, generator=g, dtype=dtype)
    x, y = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    u_fast = _math.normalize(x)
    u_ref = torch.nn.functional.normalize(y, p=2.0, dim=1, eps=_math.NORMALIZE_EPS)
    assert torch.equal(u_fast.nan_to_num(3.0), u_ref.nan_to_num(3.0))
    (grad_fast,) = torch.autograd.grad(u_fast, x, up)
    (grad_ref,) = torch.autograd.grad(u_ref, y, up)
    assert torch.equal(grad_fast.isnan(), grad_ref.isnan())
    assert grad_fast[5].isnan().all()
    rows = ~grad_ref.isnan().any(1)  # each row against its own scale (1e-14 ... 1e20)
    err = ((grad_fast - grad_ref)[rows].abs().amax(1)
           / grad_ref[rows].abs().amax(1).clamp_min(torch.finfo(dtype).tiny)).max()
    assert float(err) <= tol, float(err)
    x2 = z[6:].clone().requires_grad_(True)
    (d,) = torch.autograd.grad(_math.normalize(x2), x2, up[6:], create_graph=True)
    with pytest.raises(RuntimeError):
        d.sum().backward()
