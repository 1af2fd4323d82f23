"""Backend "cuda" (csrc/cuda, extension macl_kernels._C_cuda): its primitive is tested with every
other backend's in test_primitive.py (on a GPU) and its losses at a small shape in test_losses.py.
Here, GPU-only: every loss x layout x reduction at shapes that are not multiples of the
64 x 64 x 32 tiles and at many tiles, in float32 (CUDA-core path) and bfloat16 / float16
(tensor-core path), float64 (plain path), the learnable CLIP scale and determinism. GPU tests skip
without a CUDA device; on one, a missing extension is a failure, not a skip."""

from __future__ import annotations

import pytest
import torch

import macl_kernels as mk
from macl_kernels.primitive import ops as _ops
from conftest import (
    F32_RTOL, F64_RTOL, HALF_RTOL, LOSS_LAYOUTS, REDUCTIONS,
    assert_rel_close, assert_same_results, dense_negative_lse, loss_and_grads, loss_case,
    make_pair,
)
from macl_kernels.primitive.protocol import LogitMap

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the cuda backend's kernels)")

# (N, D): one tile with ragged everything, a few tiles with D a multiple of 32, many tiles.
SMALL_SHAPES = [(13, 7), (300, 96)]
LARGE_SHAPE = (2048, 256)
PRECISIONS = [(torch.float32, F32_RTOL), (torch.bfloat16, HALF_RTOL),
              (torch.float16, HALF_RTOL)]


def test_availability_is_reported():
    """Usable exactly when a GPU and the built extension are there; otherwise a reason."""
    reason = mk.available_backends()["cuda"]
    if not HAS_CUDA:
        assert isinstance(reason, str) and reason.strip(), reason
        assert "cpu" in mk.available_backends("cpu")["cuda"].lower()
    else:
        assert reason is None, f"CUDA is available but the cuda backend is not: {reason}"


def run(fn, z1, z2, **kwargs):
    """``conftest.loss_and_grads`` (the same fixed upstream gradient on any device), results
    returned on the CPU."""
    return tuple(t.cpu() for t in loss_and_grads(fn, z1, z2, **kwargs))


def check_loss(name, layout, reduction, n, d, dtype, tol, seed=0):
    fn, kw = loss_case(name, layout)
    z1, z2 = make_pair(n, d, seed=seed, dtype=dtype)
    want = run(fn, z1.double().cuda(), z2.double().cuda(), reduction=reduction,
               backend="reference", **kw)
    got = run(fn, z1.cuda(), z2.cuda(), reduction=reduction, backend="cuda", **kw)
    assert got[0].dtype == dtype
    assert_same_results(got, want, tol)


@gpu
@pytest.mark.parametrize("dtype,tol", PRECISIONS, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n,d", SMALL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_losses_match_reference(name, layout, reduction, n, d, dtype, tol):
    check_loss(name, layout, reduction, n, d, dtype, tol)


@gpu
@pytest.mark.parametrize("dtype,tol", PRECISIONS, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_losses_match_reference_many_tiles(name, layout, dtype, tol):
    check_loss(name, layout, "mean", *LARGE_SHAPE, dtype, tol, seed=3)


@gpu
@pytest.mark.parametrize("n,d", SMALL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("name,layout", LOSS_LAYOUTS)
def test_float64_path(name, layout, n, d):
    check_loss(name, layout, "none", n, d, torch.float64, F64_RTOL, seed=5)


@gpu
@pytest.mark.parametrize("dtype,tol", PRECISIONS + [(torch.float64, F64_RTOL)],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("n,d", SMALL_SHAPES + [LARGE_SHAPE], ids=lambda v: str(v))
def test_clip_logit_scale_gradient(n, d, dtype, tol):
    z1, z2 = make_pair(n, d, seed=11, dtype=dtype)
    # A learnable scale is an fp32 (fp64) parameter; the reference gets exactly its value.
    scale = torch.tensor(1 / 0.07, dtype=torch.float64 if dtype == torch.float64 else
                         torch.float32)
    want = run(mk.clip_loss, z1.double().cuda(), z2.double().cuda(),
               logit_scale=scale.double().cuda(), backend="reference")
    got = run(mk.clip_loss, z1.cuda(), z2.cuda(), logit_scale=scale.cuda(), backend="cuda")
    assert len(got) == 4
    assert_same_results(got, want, tol)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic(dtype):
    """No atomics: two runs give bitwise equal losses and gradients."""
    z1, z2 = (t.cuda() for t in make_pair(300, 96, seed=2, dtype=dtype))
    fn, kw = loss_case("macl", "2n")
    first = run(fn, z1, z2, backend="cuda", **kw)
    second = run(fn, z1, z2, backend="cuda", **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@gpu
def test_cpu_tensors_are_rejected():
    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match="CUDA"):
        _ops.negative_lse("cuda", x, None, torch.ones(4), torch.tensor([2, 3, 0, 1]), None)


# --------------------------------------------------------------------------------------------
# Both directions of one S (layout cross_sym on one process: both_forward_kernel,
# both_backward_kernel and the float64 path's two launches)
# --------------------------------------------------------------------------------------------

# (M, K, D): ragged single tiles; K over several tiles with M in one (forward splits > 1, the
# columns' partials from one anchor block); several tiles both ways with a ragged D; M over many
# anchor blocks (the columns' merge over blocks) with K in one.
BOTH_SHAPES = [(13, 7, 5), (37, 700, 40), (300, 130, 96), (700, 33, 64)]
ARTANH_KW = dict(artanh_scale=2.0, artanh_eps=1e-6)


def both_problem(m, k, d, logit_map, seed):
    """float64 CPU tensors ``(anchors [m, d], candidates [k, d], inv_temp [m + k] or None,
    pos_index [m + k], self_index [m + k])``: the rows' entries index the candidates, the
    columns' the anchors; every self differs from its positive."""
    g = torch.Generator().manual_seed(seed)
    norm = 0.9 if logit_map is LogitMap.ARTANH else 1.0  # artanh: |S| <= 0.81, moderate slopes
    anchors, candidates = (norm * torch.nn.functional.normalize(
        torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) for n in (m, k))
    pos_index = torch.cat([torch.randint(0, k, (m,), generator=g),
                           torch.randint(0, m, (k,), generator=g)])
    self_index = torch.cat([(pos_index[:m] + 1) % k, (pos_index[m:] + 1) % m])
    inv_temp = (1 / (0.05 + torch.rand(m + k, generator=g, dtype=torch.float64))
                if logit_map is LogitMap.SCALED else None)
    return anchors, candidates, inv_temp, pos_index, self_index


def both_oracle(anchors, candidates, inv_temp, pos_index, self_index, **kw):
    """The two dense problems, the rows' then the columns'."""
    m = anchors.shape[0]

    def part(t, rows):
        return None if t is None else t[rows]

    rows, cols = slice(0, m), slice(m, None)
    return torch.cat([
        dense_negative_lse(anchors, candidates, part(inv_temp, rows), pos_index[rows],
                           part(self_index, rows), **kw),
        dense_negative_lse(candidates, anchors, part(inv_temp, cols), pos_index[cols],
                           part(self_index, cols), **kw)])


def both_cuda(**fixed):
    def call(anchors, candidates, inv_temp, pos_index, self_index, **kw):
        return _ops.negative_lse("cuda", anchors, candidates, inv_temp, pos_index, self_index,
                                 both_directions=True, **fixed, **kw)
    return call


def run_both(fn, tensors, logit_map, dtype, device, grad=(True, True, True)):
    """``(lse_neg, d_anchors, d_candidates, d_inv_temp)`` on the CPU (``None`` for a gradient
    not asked for) of ``fn`` on ``dtype`` leaves on ``device``, with a fixed upstream gradient
    of both signs."""
    anchors, candidates, inv_temp, pos_index, self_index = tensors
    leaves = [None if t is None else
              t.detach().to(device=device, dtype=dtype).requires_grad_(wanted)
              for t, wanted in zip((anchors, candidates, inv_temp), grad)]
    kw = dict(logit_map=logit_map, **(ARTANH_KW if logit_map is LogitMap.ARTANH else {}))
    out = fn(*leaves, pos_index.to(device), self_index.to(device), **kw)
    g = torch.randn(out.shape[0], generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(device=device, dtype=out.dtype)
    needing = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, needing, g))
    return (out.detach().cpu(),) + tuple(
        next(grads).cpu() if (t is not None and t.requires_grad) else None for t in leaves)


@gpu
@pytest.mark.parametrize("dtype,tol", PRECISIONS + [(torch.float64, F64_RTOL)],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("logit_map", [LogitMap.SCALED, LogitMap.ARTANH],
                         ids=["scaled", "artanh"])
@pytest.mark.parametrize("m,k,d", BOTH_SHAPES, ids=lambda v: str(v))
def test_both_directions_match_dense_oracle(m, k, d, logit_map, dtype, tol):
    """The rows' and the columns' lse_neg and the gradients wrt both row sets and the M + K
    inverse temperatures against the two dense float64 problems (on the operands rounded to
    the input precision, as the losses pass them: float32 compute, half GEMM operands)."""
    tensors = both_problem(m, k, d, logit_map, seed=m + 7 * k + d)
    half = dtype in (torch.float16, torch.bfloat16)
    rounded = tuple(t.to(dtype).double() if (half and t is not None and i < 2) else t
                    for i, t in enumerate(tensors))
    want = run_both(both_oracle, rounded, logit_map, torch.float64, torch.device("cuda"))
    compute = torch.float32 if half else dtype
    got = run_both(both_cuda(operand_dtype=dtype if half else None), rounded, logit_map,
                   compute, torch.device("cuda"))
    assert got[0].dtype == compute and got[0].shape == (m + k,)
    names = ("lse_neg", "d_anchors", "d_candidates", "d_inv_temp")
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel_close(a, b, tol, name)


@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_RTOL), (torch.float64, 1e-12)],
                         ids=["fp32", "fp64"])
@pytest.mark.parametrize("grad", [(True, False, False), (False, True, False),
                                  (False, False, True), (True, True, True)],
                         ids=["A", "C", "T", "ACT"])
def test_both_directions_equal_two_calls(grad, dtype, tol):
    """One both-directions call against the two plain calls it replaces, with only some inputs
    needing a gradient (blocks with nothing to produce are not launched)."""
    m, k = 37, 700
    tensors = both_problem(m, k, 40, LogitMap.SCALED, seed=5)

    def two_calls(a, c, t, pos, slf, **kw):
        return torch.cat([
            _ops.negative_lse("cuda", a, c, t[:m], pos[:m], slf[:m], **kw),
            _ops.negative_lse("cuda", c, a, t[m:], pos[m:], slf[m:], **kw)])

    device = torch.device("cuda")
    both = run_both(both_cuda(), tensors, LogitMap.SCALED, dtype, device, grad=grad)
    two = run_both(two_calls, tensors, LogitMap.SCALED, dtype, device, grad=grad)
    for name, a, b in zip(("lse_neg", "d_anchors", "d_candidates", "d_inv_temp"), both, two):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel_close(a, b, tol, name)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clip_deterministic(dtype):
    """CLIP's both-directions kernels (the columns' partials merged in block order, no
    atomics): two runs give bitwise equal losses and gradients."""
    z1, z2 = (t.cuda() for t in make_pair(700, 96, seed=4, dtype=dtype))
    fn, kw = loss_case("clip", "cross_sym")
    first = run(fn, z1, z2, backend="cuda", **kw)
    second = run(fn, z1, z2, backend="cuda", **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
