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
from macl_kernels import _ops
from conftest import (
    F32_RTOL, F64_RTOL, HALF_RTOL, LOSS_LAYOUTS, REDUCTIONS,
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
def test_cpu_tensors_are_rejected():
    x = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match="CUDA"):
        _ops.negative_lse("cuda", x, None, torch.ones(4), torch.tensor([2, 3, 0, 1]), None)
