"""The fused C++/OpenMP backend (``backend="cpu"``, csrc/cpu/macl_cpu.cpp) against the float64
reference and against a dense autograd oracle of its primitive.

``make test`` builds the extension first, so nothing here is skipped when it is missing: a
missing extension is a failure (``test_extension_is_built`` says why). Shapes straddle the
kernel's 256 x 256 tiles (2N = 300, 600; N = 257) and include the degenerate ones (N = 2; D = 1 for
the primitive: normalised D = 1 rows have an identically zero input gradient).
"""

from __future__ import annotations

import pytest
import torch

import macl_kernels as mk
from conftest import (
    F32_RTOL, F64_RTOL, HALF_RTOL, LAYOUTS, LOSS_LAYOUTS, REDUCTIONS,
    assert_rel_close, assert_same_results, dense_negative_lse, loss_and_grads, loss_case,
    make_pair, upstream_like,
)
from macl_kernels.backends import cpu as CPU
from test_torch_backend import primitive_inputs

TILE = 256  # the kernel's BLOCK


def test_extension_is_built():
    assert CPU.unavailable_reason(torch.device("cpu")) is None, CPU.unavailable_reason(None)
    assert mk.available_backends("cpu")["cpu"] is None
    assert mk.available_backends()["cpu"] is None


def test_auto_prefers_cpu_backend_on_cpu_tensors():
    from macl_kernels.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_extension_built_against_this_torch():
    assert CPU._extension().built_with_torch == torch.__version__


# --------------------------------------------------------------------------------------------
# The primitive, called directly
# --------------------------------------------------------------------------------------------


def _primitive_case(square, m, k, d, artanh, dtype, seed=0):
    anchors, cand, inv_temp, pos_index, self_index = primitive_inputs(m, k, d, seed + m + k + d,
                                                                      square)
    anchors, cand, inv_temp = anchors.to(dtype), cand.to(dtype), inv_temp.to(dtype)
    if square:
        cand = cand.clone().requires_grad_(True)
        anchors = cand
        leaves = [cand]
    else:
        anchors.requires_grad_(True)
        cand.requires_grad_(True)
        leaves = [anchors, cand]
    if not artanh:
        inv_temp.requires_grad_(True)
        leaves.append(inv_temp)
    args = (None if artanh else inv_temp, pos_index, self_index,
            2.0 if artanh else None, 1e-6 if artanh else 0.0)
    return anchors, cand, args, leaves


@pytest.mark.parametrize("artanh", [False, True], ids=["scaled", "artanh"])
@pytest.mark.parametrize("square,m,k,d", [
    (True, 4, 4, 3), (True, 14, 14, 7), (True, TILE + 44, TILE + 44, 33),
    (True, 2 * TILE + 88, 2 * TILE + 88, 16), (False, 2, 2, 1), (False, 10, 13, 33),
    (False, TILE + 1, 2 * TILE + 3, 5), (False, 2 * TILE + 7, TILE - 1, 9),
])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_RTOL), (torch.float32, F32_RTOL)],
                         ids=["f64", "f32"])
def test_primitive_matches_dense(square, m, k, d, artanh, dtype, tol):
    anchors, cand, args, leaves = _primitive_case(square, m, k, d, artanh, dtype)
    got = CPU.negative_lse(anchors, cand, *args)
    # With D = 1 every similarity is +-1 and sits on the artanh clamp 1 - 1e-6, which float32
    # rounds to 1 - 1.013e-6: the fp32 logit itself differs from the float64 one by ~1e-4 there.
    # The oracle is then the same dense formula in float32, not the float64 one.
    oracle_dtype = dtype if (artanh and d == 1) else torch.float64
    want_leaves = [t.detach().to(oracle_dtype).requires_grad_(True) for t in leaves]
    if square:
        w_anchors = w_cand = want_leaves[0]
    else:
        w_anchors, w_cand = want_leaves[:2]
    w_args = (None if artanh else want_leaves[-1], *args[1:])
    want = dense_negative_lse(w_anchors, w_cand, *w_args)
    assert got.dtype == dtype
    assert_rel_close(got, want, tol, "lse_neg")
    up = upstream_like(want)
    got_grads = torch.autograd.grad(got, leaves, up.to(dtype))
    want = want.double()
    want_grads = torch.autograd.grad(want, want_leaves, up)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert a.dtype == dtype
        assert_rel_close(a, b, tol, f"grad of input {i}")


@pytest.mark.parametrize("artanh", [False, True], ids=["scaled", "artanh"])
@pytest.mark.parametrize("m", [6, 2 * TILE + 88])
def test_symmetric_tiling_equals_full_tiling(m, artanh):
    """Layout 2n passes one tensor as anchors and candidates: the kernel computes only the tiles
    on and above the diagonal. A copy of that tensor takes the full tiling: same numbers."""
    anchors, cand, args, leaves = _primitive_case(True, m, m, 17, artanh, torch.float64)
    up = upstream_like(torch.empty(m, dtype=torch.float64))
    sym = CPU.negative_lse(cand, cand, *args)
    sym_grads = torch.autograd.grad(sym, leaves, up)
    other = cand.detach().clone().requires_grad_(True)
    full = CPU.negative_lse(other, cand, *args)
    full_leaves = [other, cand] + leaves[1:]
    full_grads = torch.autograd.grad(full, full_leaves, up)
    assert_rel_close(sym, full, 1e-13, "lse_neg")
    assert_rel_close(sym_grads[0], full_grads[0] + full_grads[1], 1e-13, "d U")
    if not artanh:
        assert_rel_close(sym_grads[1], full_grads[2], 1e-13, "d inv_temp")


def test_results_are_bitwise_reproducible():
    """Per-thread accumulators summed in a fixed order, no atomics: identical runs, identical
    bits (for a given thread count)."""
    runs = []
    for _ in range(2):
        z1, z2 = make_pair(2 * TILE + 5, 24, seed=3, dtype=torch.float32)
        runs.append(loss_and_grads(mk.macl_loss, z1, z2, backend="cpu"))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_thread_count_does_not_change_results():
    z1, z2 = make_pair(TILE + 40, 16, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(mk.infonce_loss, z1, z2, backend="cpu")
        torch.set_num_threads(max(2, before))
        many = loss_and_grads(mk.infonce_loss, z1, z2, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert_same_results(many, one, 1e-13)


# --------------------------------------------------------------------------------------------
# Every public loss, layout and reduction against the float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,d", [(2, 3), (150, 33)])
@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_public_api_float64(name, layout, n, d, reduction):
    fn, kw = loss_case(name, layout)
    z1, z2 = make_pair(n, d, seed=n + d)
    got = loss_and_grads(fn, z1, z2, backend="cpu", reduction=reduction, **kw)
    want = loss_and_grads(fn, z1, z2, backend="reference", reduction=reduction, **kw)
    assert_same_results(got, want, F64_RTOL)


PRECISION_CASES = [(torch.float32, F32_RTOL), (torch.bfloat16, HALF_RTOL),
                   (torch.float16, HALF_RTOL)]


@pytest.mark.parametrize("dtype,tol", PRECISION_CASES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_low_precision_vs_float64_reference(name, layout, dtype, tol):
    fn, kw = loss_case(name, layout)
    z1, z2 = make_pair(TILE - 99, 40, seed=11, dtype=dtype)  # 2N = 314: two tiles a side
    got = loss_and_grads(fn, z1, z2, backend="cpu", **kw)
    want = loss_and_grads(fn, z1.double(), z2.double(), backend="reference", **kw)
    assert all(g.dtype == dtype for g in got)
    assert_same_results(got, want, tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["infonce", "macl", "dcl"])
def test_float32_low_temperature(name, layout):
    """1/tau = 200: logits up to 200 must not overflow the fp32 exponentials."""
    fn, kw = loss_case(name, layout)
    kw["temperature"] = 0.005
    z1, z2 = make_pair(64, 16, seed=2, dtype=torch.float32)
    got = loss_and_grads(fn, z1, z2, backend="cpu", **kw)
    want = loss_and_grads(fn, z1.double(), z2.double(), backend="reference", **kw)
    assert_same_results(got, want, F32_RTOL)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_RTOL), (torch.float32, F32_RTOL)])
def test_learnable_clip_scale(dtype, tol):
    z1, z2 = make_pair(TILE + 3, 12, seed=9, dtype=dtype)
    scale = torch.tensor(1 / 0.07, dtype=dtype)
    got = loss_and_grads(mk.clip_loss, z1, z2, logit_scale=scale, backend="cpu")
    want = loss_and_grads(mk.clip_loss, z1.double(), z2.double(), logit_scale=scale.double(),
                          backend="reference")
    assert_same_results(got, want, tol)


@pytest.mark.parametrize("name", ["infonce", "tfree", "macl"])
def test_zero_and_duplicate_rows_stay_finite(name):
    """A zero row normalises to 0 (PyTorch's eps semantics); exact duplicates put S = 1 off the
    diagonal (the artanh map's clamp). Neither may produce NaN; both match the reference."""
    fn, kw = loss_case(name, "2n")
    z1, z2 = make_pair(20, 8, seed=5)
    z1[3] = 0.0
    z2[7] = z1[7]
    z1[9] = z1[8]
    got = loss_and_grads(fn, z1, z2, backend="cpu", **kw)
    want = loss_and_grads(fn, z1, z2, backend="reference", **kw)
    assert all(torch.isfinite(g).all() for g in got)
    assert_same_results(got, want, F64_RTOL)


def test_inputs_without_grad_run_forward_only():
    z1, z2 = make_pair(30, 8, seed=6)
    with torch.no_grad():
        got = mk.macl_loss(z1, z2, backend="cpu")
    assert_rel_close(got, mk.macl_loss(z1, z2, backend="reference"), F64_RTOL, "loss")


def test_rejects_non_cpu_tensors_clearly():
    assert "CPU tensors only" in CPU.unavailable_reason(torch.device("meta"))
    with pytest.raises(RuntimeError, match="cpu"):
        mk.macl_loss(torch.randn(4, 3, device="meta"), torch.randn(4, 3, device="meta"),
                     backend="cpu", validate=False)
