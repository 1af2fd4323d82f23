"""Backend "cuda" (csrc/cuda, extension macl_kernels._C_cuda) against the float64 reference:
every loss x layout x reduction at shapes that are not multiples of the 64 x 64 x 32 tiles, in
float32 (CUDA-core path) and bfloat16 / float16 (tensor-core path), float64 (plain path), the
learnable CLIP scale, determinism and the raw primitive. GPU tests skip without a CUDA device;
on one, a missing extension is a failure, not a skip."""

from __future__ import annotations

import pytest
import torch

import macl_kernels as mk
from conftest import (
    F32_RTOL, F64_RTOL, HALF_RTOL, LOSS_LAYOUTS, REDUCTIONS, assert_rel_close,
    assert_same_results, loss_and_grads, loss_case, make_pair,
)

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
@pytest.mark.parametrize("artanh", [False, True], ids=["scaled", "artanh"])
@pytest.mark.parametrize("m,k,d", [(1, 3, 5), (70, 130, 33), (257, 65, 200)])
def test_primitive_matches_dense(m, k, d, artanh):
    """The raw primitive (no self, rectangular, per-row inv_temp with grad) against a dense
    float64 autograd computation."""
    from macl_kernels.backends import cuda as CU

    g = torch.Generator().manual_seed(m * 1000 + k + d)
    A = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    C = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    b = 1 + 9 * torch.rand(m, generator=g, dtype=torch.float64)
    pos = torch.randint(0, k, (m,), generator=g)
    up = torch.randn(m, generator=g, dtype=torch.float64)
    scale, eps = (2.0, 1e-6) if artanh else (None, 0.0)

    def dense(A, C, b):
        S = A @ C.T
        logits = scale * torch.atanh(S.clamp(-1 + eps, 1 - eps)) if artanh else S * b[:, None]
        excluded = torch.zeros_like(S, dtype=torch.bool)
        excluded[torch.arange(m), pos] = True
        return torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)

    def grads(fn, dtype, device):
        leaves = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (A, C, b)]
        out = fn(*leaves)
        gs = torch.autograd.grad(out, leaves, up.to(device=device, dtype=dtype),
                                 allow_unused=True)
        return [out.detach().cpu()] + [x if x is None else x.cpu() for x in gs]

    want = grads(dense, torch.float64, "cpu")
    got = grads(lambda a, c, bb: CU.negative_lse(a, c, None if artanh else bb, pos.cuda(), None,
                                                 scale, eps), torch.float32, "cuda")
    for name, x, y in zip(("lse", "dA", "dC"), got, want):
        assert_rel_close(x, y, F32_RTOL, name)
    if not artanh:
        assert_rel_close(got[3], want[3], F32_RTOL, "d inv_temp")
    else:
        assert got[3] is None or float(got[3].abs().max()) == 0.0


@gpu
def test_cpu_tensors_are_rejected():
    from macl_kernels.backends import cuda as CU

    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match="CUDA"):
        CU.negative_lse(x, x, torch.ones(4), torch.tensor([2, 3, 0, 1]), None, None, 0.0)
