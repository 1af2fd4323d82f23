"""The losses on top of the primitive.

The loss assembly (docs/math.md#the-primitive, "Assembling a loss": the per-anchor terms, the
layouts, the reductions and the normalisation's backward) is the same Python for every kernel
backend, so it is tested ONCE against the float64 reference: every (loss, layout) of
``macl_kernels.tools.cases.LOSS_LAYOUTS``, every reduction, through the "torch" backend in float64.
The primitive itself is tested per backend in test_primitive.py; what remains per backend is a
thin check that each one plugs into every loss and layout (a small shape, the dtypes of
``_cases.DTYPES`` the losses accept, the bound of ``_cases.tolerance``).
"""

from __future__ import annotations

import pytest
import torch

import macl_kernels as mk
from conftest import (
    DTYPES, F64_RTOL, INTERPRETED, KERNEL_BACKENDS, LOSS_CASES, LOSS_LAYOUTS, REDUCTIONS, assert_rel_close,
    assert_same_results, backend_device, loss_and_grads, loss_case, make_pair, tolerance,
    heavy_on_interpreter, upstream_like,
)

# (N, D): the smallest batch, and odd sizes over several chunks of the torch backend's tiny tiles
# below (2 to 8 rows per chunk, none dividing the rows).
ASSEMBLY_SHAPES = [(2, 3), (9, 7)]


@pytest.fixture
def tiny_chunks(monkeypatch):
    """The torch backend in chunks of a few rows (80 elements per tile), so that the loss layer's
    inputs straddle chunk edges even at these sizes."""
    from macl_kernels.primitive.backends import torch_chunked

    monkeypatch.setattr(torch_chunked, "TILE_ELEMENTS", 80)


@pytest.mark.parametrize("n,d", ASSEMBLY_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_loss_assembly_matches_reference(tiny_chunks, name, layout, reduction, n, d):
    z1, z2 = make_pair(n, d, seed=n * d + 3)
    fn, kw = loss_case(name, layout)
    got = loss_and_grads(fn, z1, z2, reduction=reduction, backend="torch", **kw)
    want = loss_and_grads(fn, z1, z2, reduction=reduction, backend="reference", **kw)
    assert_same_results(got, want, tolerance("torch", "float64"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n,d", ASSEMBLY_SHAPES, ids=lambda v: str(v))
def test_loss_assembly_learnable_clip_scale(tiny_chunks, n, d, reduction):
    """The gradient into CLIP's learnable scale (through the primitive's d_inv_temp)."""
    z1, z2 = make_pair(n, d, seed=n + d)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    fn, _ = loss_case("clip", "cross_sym")
    got = loss_and_grads(fn, z1, z2, logit_scale=scale, reduction=reduction, backend="torch")
    want = loss_and_grads(fn, z1, z2, logit_scale=scale, reduction=reduction,
                          backend="reference")
    assert got[3].shape == ()
    assert_same_results(got, want, tolerance("torch", "float64"))


# Per backend: every loss and layout, in every dtype the losses accept, at one small shape.
BACKEND_DTYPES = ["float64", "float32", "bfloat16", "float16"]


@pytest.mark.parametrize("backend,dtype_name", [
    pytest.param(b, t, marks=[pytest.mark.slow] if (b in INTERPRETED and t != "float32") else [])
    for b in KERNEL_BACKENDS for t in BACKEND_DTYPES])
@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_every_loss_on_every_backend(backend, name, layout, dtype_name):
    """The loss and its gradients (``reduction="none"``, a random upstream gradient) on
    ``dtype`` inputs against the float64 reference on the same rounded inputs."""
    dtype = DTYPES[dtype_name]
    fn, kw = loss_case(name, layout)
    z1, z2 = make_pair(6, 5, seed=17, dtype=dtype)
    device = backend_device(backend)
    got = loss_and_grads(fn, z1.to(device), z2.to(device), reduction="none", backend=backend,
                         **kw)
    got = [t.detach().cpu() for t in got]
    assert all(t.dtype == dtype for t in got)
    want = loss_and_grads(fn, z1.double(), z2.double(), reduction="none", backend="reference",
                          **kw)
    assert_same_results(got, want, tolerance(backend, dtype_name))


@pytest.mark.parametrize("dtype_name", BACKEND_DTYPES)
@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
def test_learnable_clip_scale_on_every_backend(backend, dtype_name):
    """A learnable scale is a float32 (float64) parameter, also with half embeddings."""
    dtype = DTYPES[dtype_name]
    z1, z2 = make_pair(9, 6, seed=9, dtype=dtype)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64 if dtype == torch.float64 else
                         torch.float32)
    fn, _ = loss_case("clip", "cross_sym")
    device = backend_device(backend)
    got = loss_and_grads(fn, z1.to(device), z2.to(device), logit_scale=scale.to(device),
                         backend=backend)
    want = loss_and_grads(fn, z1.double(), z2.double(), logit_scale=scale.double(),
                          backend="reference")
    assert_same_results([t.cpu() for t in got], want, tolerance(backend, dtype_name))


@pytest.mark.parametrize("temperature,reduction", [(0.02, "none"), (0.005, "mean")])
@pytest.mark.parametrize("layout", ["2n", "cross", "cross_sym"])
@pytest.mark.parametrize("name", ["infonce", "dcl", "macl"])
@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
def test_float32_low_temperature(backend, name, layout, temperature, reduction):
    """1/tau = 50 per anchor, 1/tau = 200 on the mean: logits up to 200 must not overflow the
    float32 exponentials, and the LSE and accumulators stay accurate in float32. (At 1/tau = 200
    a per-anchor loss near 0 is itself ill-conditioned: ~1.5e-5 relative in float32 whatever
    computes it.)"""
    fn, kw = loss_case(name, layout)
    kw["temperature"] = temperature
    # 1/tau = 200: 64 rows, so that the mean loss (with its many negatives) is not itself near 0.
    z1, z2 = make_pair(20 if temperature >= 0.02 else 64, 16, seed=2, dtype=torch.float32)
    device = backend_device(backend)
    got = loss_and_grads(fn, z1.to(device), z2.to(device), reduction=reduction, backend=backend,
                         **kw)
    want = loss_and_grads(fn, z1.double(), z2.double(), reduction=reduction,
                          backend="reference", **kw)
    assert_same_results([t.cpu() for t in got], want, tolerance(backend, "float32"))


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("name", ["infonce", "tfree", "macl"])
@pytest.mark.parametrize("backend", heavy_on_interpreter(KERNEL_BACKENDS))
def test_zero_and_duplicate_rows_stay_finite(backend, name, dtype_name):
    """A zero row normalises to 0 (PyTorch's eps semantics); exact duplicates put S = 1 off the
    diagonal (the artanh map's clamp). Neither may produce NaN; both match the reference.
    Duplicates in float64 only: in float32 the clamped logit 2 artanh(1 - 1e-6) itself is off by
    ~1e-3 relative (1 - 1e-6 rounds), the same for every backend (test_triton_backend.py's
    duplicates test bounds that case)."""
    dtype = DTYPES[dtype_name]
    fn, kw = loss_case(name, "2n")
    z1, z2 = make_pair(13, 8, seed=5)
    z1[3] = 0.0
    z2[7] = 0.0
    if dtype == torch.float64:
        z1[9] = z1[8]
    z1, z2 = z1.to(dtype), z2.to(dtype)
    device = backend_device(backend)
    got = [t.cpu() for t in loss_and_grads(fn, z1.to(device), z2.to(device), backend=backend,
                                           **kw)]
    assert all(torch.isfinite(g).all() for g in got)
    want = loss_and_grads(fn, z1.double(), z2.double(), backend="reference", **kw)
    assert_same_results(got, want, tolerance(backend, dtype_name))


@pytest.mark.parametrize("backend", heavy_on_interpreter(("reference",) + KERNEL_BACKENDS))
@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_inputs_are_not_mutated(name, backend):
    z1, z2 = make_pair(6, 5, seed=36)
    device = backend_device(backend) if backend != "reference" else torch.device("cpu")
    z1, z2 = z1.to(device), z2.to(device)
    fn, kw = loss_case(name, "2n")
    if name == "clip":
        kw["logit_scale"] = torch.tensor(5.0, dtype=torch.float64, requires_grad=True,
                                         device=device)
        scale_before = kw["logit_scale"].detach().clone()
    for normalize in (True, False):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        loss = fn(a, b, normalize=normalize, reduction="none", backend=backend, **kw)
        loss.backward(upstream_like(loss))
        assert torch.equal(a.detach(), z1) and torch.equal(b.detach(), z2)
    if name == "clip":
        assert torch.equal(kw["logit_scale"].detach(), scale_before)


# --------------------------------------------------------------------------------------------
# The loss layer's flags and argument handling (through "torch", against the reference)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_normalize_false_with_prenormalized_inputs(name, layout):
    z1, z2 = make_pair(6, 5, seed=33)
    u1, u2 = (torch.nn.functional.normalize(z, dim=1) for z in (z1, z2))
    fn, kw = loss_case(name, layout)
    got = loss_and_grads(fn, u1, u2, normalize=False, reduction="none", backend="torch", **kw)
    want = loss_and_grads(fn, u1, u2, normalize=False, reduction="none", backend="reference",
                          **kw)
    assert_same_results(got, want, F64_RTOL)
    # Same value as normalising inside.
    inside = fn(z1, z2, reduction="none", backend="torch", **kw)
    assert_rel_close(got[0], inside, 1e-12)


@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_clip_logit_scale_gradient(reduction, normalize, shape):
    z1, z2 = make_pair(7, 5, seed=34)
    scale = torch.full(shape, 4.0, dtype=torch.float64)
    got = loss_and_grads(mk.clip_loss, z1, z2, logit_scale=scale, normalize=normalize,
                         reduction=reduction, backend="torch")
    want = loss_and_grads(mk.clip_loss, z1, z2, logit_scale=scale, normalize=normalize,
                          reduction=reduction, backend="reference")
    assert_same_results(got, want, F64_RTOL)
    assert got[3].shape == shape
    # docs/math.md#clip: dL/ds = sum(H * S) for the mean reduction.
    if reduction == "mean":
        u1, u2 = (torch.nn.functional.normalize(z, dim=1) if normalize else z for z in (z1, z2))
        S = u1 @ u2.T
        eye = torch.eye(7, dtype=torch.float64)
        H = ((torch.softmax(4.0 * S, 1) - eye) + (torch.softmax(4.0 * S, 0) - eye)) / (2 * 7)
        g = upstream_like(got[0])
        assert got[3].reshape(()).item() == pytest.approx((g * (H * S).sum()).item(), rel=1e-10)


@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_non_unit_upstream_per_anchor(name, layout):
    """With reduction="none", the gradient of g . loss is sum_a g_a grad(loss_a)."""
    z1, z2 = make_pair(5, 4, seed=35)
    fn, kw = loss_case(name, layout)
    z1r, z2r = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    per_anchor = fn(z1r, z2r, reduction="none", backend="torch", **kw)
    g = upstream_like(per_anchor)
    total = torch.autograd.grad(per_anchor, (z1r, z2r), g, retain_graph=True)
    parts = [torch.zeros_like(z1), torch.zeros_like(z2)]
    for a in range(per_anchor.shape[0]):
        for acc, grad in zip(parts, torch.autograd.grad(per_anchor[a], (z1r, z2r),
                                                        retain_graph=True)):
            acc += g[a] * grad
    assert_rel_close(total[0], parts[0], 1e-12)
    assert_rel_close(total[1], parts[1], 1e-12)


@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_inputs_without_grad(name):
    z1, z2 = make_pair(6, 5, seed=37)
    fn, kw = loss_case(name, "2n")
    loss = fn(z1, z2, backend="torch", **kw)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(fn(z1, z2, backend="reference", **kw).item(), rel=1e-12)
    # Only one input requiring grad: its gradient matches the reference.
    for which in (0, 1):
        grads = []
        for backend in ("torch", "reference"):
            zs = [z1.clone(), z2.clone()]
            zs[which].requires_grad_(True)
            out = fn(*zs, backend=backend, **kw)
            grads.append(torch.autograd.grad(out, zs[which])[0])
        assert_rel_close(grads[0], grads[1], F64_RTOL)


@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_non_contiguous_inputs(name, layout):
    z1, z2 = make_pair(6, 5, seed=40)
    z1_t = z1.T.contiguous().T  # same values, column-major strides
    z2_s = torch.stack([z2, -z2], dim=2)[:, :, 0]  # same values, column stride 2
    assert not z1_t.is_contiguous() and not z2_s.is_contiguous()
    fn, kw = loss_case(name, layout)
    got = loss_and_grads(fn, z1_t, z2_s, reduction="none", backend="torch", **kw)
    want = loss_and_grads(fn, z1, z2, reduction="none", backend="reference", **kw)
    assert_same_results(got, want, F64_RTOL)


def test_under_no_grad():
    z1, z2 = make_pair(6, 5, seed=38)
    with torch.no_grad():
        loss = mk.macl_loss(z1.requires_grad_(True), z2, backend="torch")
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(mk.macl_loss(z1.detach(), z2, backend="reference").item(),
                                        rel=1e-12)
