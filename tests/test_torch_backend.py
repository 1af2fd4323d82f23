"""The chunked pure-PyTorch backend against the float64 reference: the primitive itself at tiny
chunks, every public loss at awkward shapes, lower-precision inputs (SPEC section 8 tolerances),
gradients into a learnable CLIP scale, and its O((M + K) D) memory promise."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import macl_kernels as mk
from conftest import (
    F32_RTOL, F64_RTOL, HALF_RTOL, LAYOUT_LOSSES, LAYOUTS, LOSS_CASES, LOSS_LAYOUTS,
    assert_rel_close, assert_same_results, dense_negative_lse, loss_and_grads, loss_case,
    make_pair, upstream_like,
)
from macl_kernels.backends import torch_chunked as TC

# --------------------------------------------------------------------------------------------
# The primitive: lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak), called directly with tiny chunks
# --------------------------------------------------------------------------------------------


def primitive_inputs(m, k, d, seed, square):
    g = torch.Generator().manual_seed(seed)
    cand = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    if square:  # layout 2n: anchors are the candidates, skip self, positive is the other view
        anchors = cand
        self_index = torch.arange(m)
        pos_index = (torch.arange(m) + m // 2) % m
    else:
        anchors = torch.nn.functional.normalize(
            torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
        self_index = None
        pos_index = torch.randperm(k, generator=g)[:m] if m <= k else torch.arange(m) % k
    inv_temp = 1 / (0.05 + torch.rand(m, generator=g, dtype=torch.float64))
    return anchors, cand, inv_temp, pos_index, self_index


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
@pytest.mark.parametrize("artanh", [False, True], ids=["scaled", "artanh"])
@pytest.mark.parametrize("square,m,k,d", [
    (True, 14, 14, 7), (True, 4, 4, 3), (False, 10, 13, 33), (False, 2, 2, 1), (False, 7, 7, 5),
])
def test_primitive_matches_dense(square, m, k, d, artanh, chunk):
    anchors, cand, inv_temp, pos_index, self_index = primitive_inputs(m, k, d, m + k + d, square)
    if square:
        anchors = cand = cand.clone().requires_grad_(True)
        leaves = [cand, inv_temp.requires_grad_(not artanh)]
    else:
        anchors.requires_grad_(True)
        cand.requires_grad_(True)
        leaves = [anchors, cand, inv_temp.requires_grad_(not artanh)]
    leaves = [t for t in leaves if t.requires_grad]
    args = (inv_temp if not artanh else None, pos_index, self_index,
            2.0 if artanh else None, 1e-6 if artanh else 0.0)
    got = TC.negative_lse(anchors, cand, *args, chunk=chunk)
    want = dense_negative_lse(anchors, cand, *args)
    assert_rel_close(got, want, F64_RTOL, "lse_neg")
    up = upstream_like(want)
    got_grads = torch.autograd.grad(got, leaves, up)
    want_grads = torch.autograd.grad(want, leaves, up)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_rel_close(a, b, F64_RTOL, f"grad of input {i}")


def test_primitive_artanh_self_similarity_exactly_one():
    """Self similarity exactly 1 (e.g. a one-hot row) is excluded from Neg(a); its gradient must
    be 0, not 0 * 1/(1 - 1) = NaN."""
    U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]], dtype=torch.float64,
                     requires_grad=True)
    rows = torch.arange(4)
    args = (None, (rows + 2) % 4, rows, 2.0, 1e-6)
    got = torch.autograd.grad(TC.negative_lse(U, U, *args, chunk=3).sum(), U)[0]
    want = torch.autograd.grad(dense_negative_lse(U, U, *args).sum(), U)[0]
    assert torch.isfinite(got).all(), got
    assert_rel_close(got, want, F64_RTOL)


# --------------------------------------------------------------------------------------------
# Public API with tiny tiles (TILE_ELEMENTS monkeypatched): N not a multiple of the chunk
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Make the public API use chunks of a few rows; records the chunks it picked."""
    picked = []
    original = TC.default_chunk

    def spy(num_rows, num_candidates):
        chunk = original(num_rows, num_candidates)
        picked.append((num_rows, num_candidates, chunk))
        return chunk

    monkeypatch.setattr(TC, "TILE_ELEMENTS", 80)
    monkeypatch.setattr(TC, "default_chunk", spy)
    return picked


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n,d", [(2, 3), (7, 7), (13, 33)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", LAYOUT_LOSSES)
def test_public_api_tiny_chunks_float64(tiny_tiles, name, layout, n, d, reduction):
    z1, z2 = make_pair(n, d, seed=n * d)
    fn, kw = loss_case(name, layout)
    got = loss_and_grads(fn, z1, z2, reduction=reduction, backend="torch", **kw)
    want = loss_and_grads(fn, z1, z2, reduction=reduction, backend="reference", **kw)
    assert_same_results(got, want, F64_RTOL)
    assert tiny_tiles and all(chunk <= max(1, 80 // k) for _, k, chunk in tiny_tiles)
    if n == 13:  # chunks that do not divide the rows
        assert any(rows % chunk for rows, _, chunk in tiny_tiles)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n,d", [(2, 3), (7, 7), (13, 33)])
def test_public_api_tiny_chunks_clip_float64(tiny_tiles, n, d, reduction):
    z1, z2 = make_pair(n, d, seed=n + d)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    got = loss_and_grads(mk.clip_loss, z1, z2, logit_scale=scale, reduction=reduction,
                         backend="torch")
    want = loss_and_grads(mk.clip_loss, z1, z2, logit_scale=scale, reduction=reduction,
                          backend="reference")
    assert_same_results(got, want, F64_RTOL)
    assert got[3].shape == ()


def test_default_tile_is_not_tiny():
    assert TC.default_chunk(8, 8) == 8
    assert TC.default_chunk(1 << 20, 1 << 20) == max(1, TC.TILE_ELEMENTS >> 20)


# --------------------------------------------------------------------------------------------
# Lower precision inputs against the float64 reference (SPEC section 8)
# --------------------------------------------------------------------------------------------

PRECISION_CASES = [(torch.float32, F32_RTOL), (torch.bfloat16, HALF_RTOL),
                   (torch.float16, HALF_RTOL)]


@pytest.mark.parametrize("dtype,tol", PRECISION_CASES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_low_precision_vs_float64_reference(tiny_tiles, name, layout, dtype, tol):
    z1, z2 = make_pair(24, 16, seed=31, dtype=dtype)
    fn, kw = loss_case(name, layout)
    got = loss_and_grads(fn, z1, z2, reduction="none", backend="torch", **kw)
    for t in got:
        assert t.dtype == dtype
    # The reference on the same (rounded) inputs, in float64.
    want = loss_and_grads(fn, z1.double(), z2.double(), reduction="none", backend="reference",
                          **kw)
    assert_same_results(got, want, tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["infonce", "dcl", "macl"])
def test_float32_low_temperature(name, layout):
    """1/tau = 50: logits, LSE and accumulators must stay accurate in float32."""
    z1, z2 = make_pair(64, 32, seed=1, dtype=torch.float32)
    fn = getattr(mk, f"{name}_loss")
    kw = dict(temperature=0.02, layout=layout, reduction="none")
    got = loss_and_grads(fn, z1, z2, backend="torch", **kw)
    want = loss_and_grads(fn, z1.double(), z2.double(), backend="reference", **kw)
    assert_same_results(got, want, F32_RTOL)


@pytest.mark.parametrize("dtype,tol", PRECISION_CASES, ids=["fp32", "bf16", "fp16"])
def test_low_precision_learnable_clip_scale(dtype, tol):
    z1, z2 = make_pair(16, 8, seed=32, dtype=dtype)
    scale = torch.tensor(1 / 0.07, dtype=torch.float32)
    got = loss_and_grads(mk.clip_loss, z1, z2, logit_scale=scale, backend="torch")
    want = loss_and_grads(mk.clip_loss, z1.double(), z2.double(), logit_scale=scale.double(),
                          backend="reference")
    assert_same_results(got, want, tol)


# --------------------------------------------------------------------------------------------
# Flags and argument handling
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
    # SPEC section 3: dL/ds = sum(H * S) for the mean reduction.
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


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_inputs_are_not_mutated(name, backend):
    z1, z2 = make_pair(6, 5, seed=36)
    fn, kw = loss_case(name, "2n")
    if name == "clip":
        kw["logit_scale"] = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        scale_before = kw["logit_scale"].detach().clone()
    for normalize in (True, False):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        loss = fn(a, b, normalize=normalize, reduction="none", backend=backend, **kw)
        loss.backward(upstream_like(loss))
        assert torch.equal(a.detach(), z1) and torch.equal(b.detach(), z2)
    if name == "clip":
        assert torch.equal(kw["logit_scale"].detach(), scale_before)


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


# --------------------------------------------------------------------------------------------
# Memory shape: never an M x K tensor (SPEC section 6)
# --------------------------------------------------------------------------------------------

MEM_N, MEM_D = 64, 8


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _run_recording(name, layout, backend):
    z1, z2 = make_pair(MEM_N, MEM_D, seed=39)
    fn, kw = loss_case(name, layout)
    if name == "clip":
        kw["logit_scale"] = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    saved = []
    with _LargestOutput() as mode:
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = fn(z1, z2, backend=backend, **kw)
        loss.backward()
    return saved, mode.largest


@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_torch_backend_never_materialises_similarity_matrix(monkeypatch, name, layout):
    monkeypatch.setattr(TC, "TILE_ELEMENTS", 256)
    # The smallest similarity block of any layout is N x N (2n: 2N x 2N; cross_sym: 2 of N x N).
    limit = MEM_N * MEM_N
    saved, largest = _run_recording(name, layout, "torch")
    assert saved, "saved_tensors_hooks saw nothing: the check would be vacuous"
    assert max(saved) < limit, f"a saved tensor has {max(saved)} >= N*N = {limit} elements"
    assert largest < limit, f"an operator produced {largest} >= N*N = {limit} elements"
    assert largest <= max(256, 2 * MEM_N * MEM_D)


def test_memory_check_detects_the_reference():
    """Positive control: the full-matrix reference does save and build M x K tensors."""
    saved, largest = _run_recording("macl", "2n", "reference")
    assert max(saved) >= (2 * MEM_N) ** 2
    assert largest >= (2 * MEM_N) ** 2
