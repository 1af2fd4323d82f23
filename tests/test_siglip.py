"""SigLIP (docs/math.md#siglip): the softplus row reduction of the primitive on every kernel
backend, ``siglip_loss`` and the drop-in ``SigLipLoss``.

- the primitive's ``RowReduction.SOFTPLUS`` (with a per-row bias, ``self_index``, a random upstream
  gradient, shapes straddling the kernels' tiles) against a dense autograd oracle, and its
  argument checks;
- the loss against OpenCLIP's ``SigLipLoss`` semantics re-implemented below from its definition
  (labels ``2 I - 1``, ``-logsigmoid(labels * logits).sum() / B``), values and the gradients of
  the image and text features, the scale and the bias, to 1e-9 in float64; the values OpenCLIP
  itself gives on three seeded cases; more texts than images (extra negatives) against the
  float64 reference; ``B = 1``; logits of magnitude 1e4; float32; reductions;
- bad inputs, the NaN policy and the drop-in's options.

Every registry case (``_cases.py``, loss ``siglip``) also runs through the generic loss, verify,
bench and distributed suites.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from conftest import (
    COMPUTE_BACKENDS, F32_RTOL, INTERPRETED, KERNEL_BACKENDS, assert_rel_close, backend_device,
    heavy_on_interpreter,
)
from macl_kernels import reference
from macl_kernels.primitive import ops as _ops
from macl_kernels.primitive.protocol import LogitMap, RowReduction

PEER_TOL = 1e-9  # float64 parity with OpenCLIP's semantics (the bar)
F64_TOL = 1e-10
SOFTPLUS = RowReduction.SOFTPLUS
LOSS_BACKENDS = heavy_on_interpreter(COMPUTE_BACKENDS + INTERPRETED)


def unit_rows(n, d, gen, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


# --------------------------------------------------------------------------------------------
# The primitive: RowReduction.SOFTPLUS
# --------------------------------------------------------------------------------------------


def dense_softplus_neg(anchors, candidates, inv_temp, pos_index, self_index, row_bias):
    """``sum_{k in Neg(a)} softplus(inv_temp[a] S_ak + row_bias[a])`` by the full matrix."""
    logits = inv_temp[:, None] * (anchors @ candidates.T)
    if row_bias is not None:
        logits = logits + row_bias[:, None]
    rows = torch.arange(logits.shape[0])
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[rows, pos_index] = False
    if self_index is not None:
        keep[rows, self_index] = False
    return torch.where(keep, torch.logaddexp(logits, torch.zeros_like(logits)), 0.0).sum(dim=1)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("m,k,d,with_self,with_bias", [
    (5, 7, 3, True, True), (70, 33, 9, False, True), (300, 270, 6, True, False), (1, 1, 4, False, True),
], ids=["small", "ragged", "multi-tile", "empty-Neg"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_primitive_matches_dense_oracle(backend, m, k, d, with_self, with_bias, dtype):
    if backend in INTERPRETED and m * k > 10000:
        pytest.skip("interpreter: the multi-tile shape runs in the loss-level tests")
    gen = torch.Generator().manual_seed(m * 1000 + k)
    anchors, candidates = unit_rows(m, d, gen), unit_rows(k, d, gen)
    inv_temp = 1 + 30 * torch.rand(m, generator=gen, dtype=torch.float64)
    row_bias = 8 * torch.randn(m, generator=gen, dtype=torch.float64) if with_bias else None
    pos_index = torch.randint(0, k, (m,), generator=gen)
    self_index = (pos_index + 1) % k if with_self else None
    g = torch.randn(m, generator=gen, dtype=torch.float64)
    tensors = [anchors, candidates, inv_temp] + ([row_bias] if with_bias else [])
    device = backend_device(backend)
    results = []
    for fn, dt, dev in [(None, dtype, device), (dense_softplus_neg, torch.float64, "cpu")]:
        leaves = [t.to(device=dev, dtype=dt).requires_grad_() for t in tensors]
        args = (leaves[0], leaves[1], leaves[2], pos_index.to(dev),
                None if self_index is None else self_index.to(dev))
        bias = leaves[3] if with_bias else None
        if fn is None:
            out = _ops.negative_lse(backend, *args, LogitMap.SCALED, row_reduction=SOFTPLUS,
                                    row_bias=bias)
        else:
            out = fn(*args, bias)
        grads = torch.autograd.grad(out, leaves, g.to(device=dev, dtype=out.dtype))
        results.append([out.detach().cpu(), *(x.cpu() for x in grads)])
    tol = F64_TOL if dtype == torch.float64 else F32_RTOL
    if backend == "triton" and dtype == torch.float32:
        tol = 1e-3  # tf32 dots (docs/math.md#tolerances)
    for what, got, want in zip(["sp_neg", "d_anchors", "d_candidates", "d_inv_temp",
                                "d_row_bias"], *results):
        if float(want.norm()) == 0:
            assert float(got.abs().max()) == 0, what  # empty Neg(a): exactly 0
        else:
            assert_rel_close(got, want, tol, what)


def test_primitive_softplus_argument_checks():
    x = torch.randn(4, 3, dtype=torch.float64)
    inv_temp, pos = torch.ones(4, dtype=torch.float64), torch.arange(4)
    with pytest.raises(ValueError, match="SCALED"):
        _ops.negative_lse("torch", x, x.clone(), None, pos, None, LogitMap.ARTANH, 2.0, 1e-6,
                          row_reduction=SOFTPLUS)
    with pytest.raises(ValueError, match="distinct candidates"):
        _ops.negative_lse("torch", x, None, inv_temp, pos, None, row_reduction=SOFTPLUS)
    with pytest.raises(ValueError, match="row_bias"):
        _ops.negative_lse("torch", x, x.clone(), inv_temp, pos, None, row_reduction=SOFTPLUS,
                          row_bias=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="SOFTPLUS only"):
        _ops.negative_lse("torch", x, x.clone(), inv_temp, pos, None,
                          row_bias=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        RowReduction(2)


def test_cpu_kernel_is_deterministic():
    gen = torch.Generator().manual_seed(3)
    img, txt = unit_rows(300, 16, gen, torch.float32), unit_rows(300, 16, gen, torch.float32)
    runs = []
    for _ in range(2):
        leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
        loss = mk.siglip_loss(*leaves, 10.0, -10.0, backend="cpu")
        runs.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# The loss against OpenCLIP's semantics
# --------------------------------------------------------------------------------------------


def openclip_siglip(image_features, text_features, logit_scale, logit_bias=None):
    """OpenCLIP's ``SigLipLoss`` (one process, ``B == K``), re-implemented from its definition:
    ``logits = t img txt^T + b``, labels ``2 I - 1``, ``-logsigmoid(labels * logits).sum() / B``.
    No normalisation (the model does it)."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n = image_features.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def four_grads(fn, img, txt, t, b):
    """Loss and gradients wrt image, text, scale and bias (fresh float64 leaves)."""
    leaves = [x.detach().clone().requires_grad_() for x in (img, txt, t, b)]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("n,d,t,b", [(6, 5, 3.7, 0.4), (40, 8, 10.0, -10.0),
                                     (300, 16, 100.0, -70.0)])
def test_matches_openclip_semantics_float64(backend, n, d, t, b):
    if backend in INTERPRETED and n > 100:
        n = 70  # several interpreter tiles, seconds not minutes
    gen = torch.Generator().manual_seed(n)
    img, txt = unit_rows(n, d, gen), unit_rows(n, d, gen)
    t, b = torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    want = four_grads(openclip_siglip, img, txt, t, b)
    device = backend_device(backend)

    def ours(i, x, s, c):
        return mk.SigLipLoss(backend=backend)(i.to(device), x.to(device), s, c)

    got = four_grads(ours, img, txt, t, b)
    for what, g, w in zip(["loss", "d image", "d text", "d scale", "d bias"], got, want):
        assert_rel_close(g.cpu(), w, PEER_TOL, what)


# OpenCLIP's SigLipLoss run in float64 on seeded inputs (img = normalize(randn(B, D)), then txt =
# normalize(randn(K, D)) from Generator(seed)): (B, K, D, seed, t, b) -> (loss, dL/dt, dL/db).
# The third, with K > B, is its chunked path (exact up to its softplus threshold, ~1e-9).
OPENCLIP_VALUES = [
    ((4, 4, 3, 0, 10.0, -10.0), (13.5371531357806, 0.470808541639995, -0.857088192144534)),
    ((6, 6, 5, 1, 3.7, 0.4), (6.15516619091726, 0.592806221830184, 2.25231699535235)),
    ((4, 6, 3, 2, 5.0, -2.0), (4.64186154694352, 0.839244107056954, 0.650657783598968)),
]


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("case,values", OPENCLIP_VALUES, ids=["init", "mid", "more-texts"])
def test_openclip_values(backend, case, values):
    B, K, D, seed, t, b = case
    gen = torch.Generator().manual_seed(seed)
    img, txt = unit_rows(B, D, gen), unit_rows(K, D, gen)
    device = backend_device(backend)
    scale = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    loss = mk.siglip_loss(img.to(device), txt.to(device), scale, bias, normalize=False,
                          backend=backend)
    loss.backward()
    for got, want in zip((loss, scale.grad, bias.grad), values):
        assert abs(float(got.detach()) - want) <= 1e-12 * max(1.0, abs(want))


def test_openclip_per_row_values():
    """S1's per-image losses and ``||d img||`` as OpenCLIP gives them."""
    gen = torch.Generator().manual_seed(0)
    img, txt = unit_rows(4, 3, gen), unit_rows(4, 3, gen)
    img.requires_grad_()
    rows = mk.siglip_loss(img, txt, 10.0, -10.0, normalize=False, reduction="none",
                          backend="cpu")
    want = torch.tensor([8.53713146723, 8.735208219022, 19.008101938724, 17.868170918146],
                        dtype=torch.float64)
    assert torch.allclose(rows.detach(), want, rtol=0, atol=1e-10)
    (d_img,) = torch.autograd.grad(rows.mean(), img)
    assert abs(float(d_img.norm()) - 5.59845344996) <= 1e-10


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_more_texts_than_images_match_the_reference(backend):
    """Extra texts are negatives for every image; exact softplus (OpenCLIP's chunked path
    thresholds it at 20, its unchunked path refuses B != K)."""
    gen = torch.Generator().manual_seed(11)
    img, txt = torch.randn(37, 6, generator=gen, dtype=torch.float64), \
        torch.randn(53, 6, generator=gen, dtype=torch.float64)
    t, b = torch.tensor(30.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    device = backend_device(backend)

    def ours(i, x, s, c):
        return mk.siglip_loss(i.to(device), x.to(device), s, c, backend=backend)

    want = four_grads(lambda *a: reference.siglip_loss(*a), img, txt, t, b)
    got = four_grads(ours, img, txt, t, b)
    for what, g, w in zip(["loss", "d image", "d text", "d scale", "d bias"], got, want):
        assert_rel_close(g.cpu(), w, F64_TOL, what)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("K", [1, 3])
def test_batch_of_one(backend, K):
    """One image: its positive and ``K - 1`` negatives (none for K = 1) - a valid batch."""
    gen = torch.Generator().manual_seed(K)
    img, txt = torch.randn(1, 4, generator=gen, dtype=torch.float64), \
        torch.randn(K, 4, generator=gen, dtype=torch.float64)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    want = four_grads(lambda *a: reference.siglip_loss(*a), img, txt, t, b)
    got = four_grads(lambda *a: mk.siglip_loss(*a, backend=backend), img, txt, t, b)
    for what, g, w in zip(["loss", "d image", "d text", "d scale", "d bias"], got, want):
        assert_rel_close(g, w, F64_TOL, what)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_logits_of_magnitude_1e4_stay_exact(backend, dtype):
    """``t = 1e4``: every logit is ``+-1e4``-scale; softplus and sigmoid must neither overflow
    nor cancel (the positive's term is split out)."""
    gen = torch.Generator().manual_seed(5)
    img = unit_rows(20, 4, gen)
    txt = (img + 0.3 * unit_rows(20, 4, gen))  # positives aligned: large positive logits too
    t, b = torch.tensor(1e4, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    want = four_grads(lambda *a: reference.siglip_loss(*a), img, txt, t, b)
    device = backend_device(backend)

    def ours(i, x, s, c):
        return mk.siglip_loss(i.to(device, dtype), x.to(device, dtype), s.to(dtype),
                              c.to(dtype), backend=backend).double()

    got = four_grads(ours, img, txt, t, b)
    assert float(want[0]) > 1e3  # the magnitude really is there
    tol = F64_TOL if dtype == torch.float64 else 1e-3  # fp32: S is rounded, then scaled by 1e4
    for what, g, w in zip(["loss", "d image", "d text", "d scale", "d bias"], got, want):
        assert torch.isfinite(g).all(), what
        assert_rel_close(g.cpu(), w, tol, what)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
def test_reductions_bias_forms_and_float32(backend):
    gen = torch.Generator().manual_seed(2)
    img, txt = torch.randn(12, 5, generator=gen), torch.randn(15, 5, generator=gen)
    rows = mk.siglip_loss(img, txt, 7.0, -2.0, reduction="none", backend=backend)
    assert rows.shape == (12,) and rows.dtype == torch.float32
    want = reference.siglip_loss(img.double(), txt.double(), 7.0, -2.0, reduction="none")
    assert_rel_close(rows, want, F32_RTOL, "per-row")
    assert_rel_close(mk.siglip_loss(img, txt, 7.0, -2.0, reduction="sum", backend=backend),
                     want.sum(), F32_RTOL, "sum")
    mean = mk.siglip_loss(img, txt, 7.0, -2.0, backend=backend)
    assert_rel_close(mean, want.mean(), F32_RTOL, "mean")
    # A float bias, a 0-d tensor bias and no bias.
    as_tensor = mk.siglip_loss(img, txt, torch.tensor(7.0), torch.tensor(-2.0), backend=backend)
    assert_rel_close(as_tensor, mean, 1e-6, "tensor bias")
    no_bias = mk.siglip_loss(img, txt, 7.0, None, backend=backend)
    assert_rel_close(no_bias, reference.siglip_loss(img.double(), txt.double(), 7.0),
                     F32_RTOL, "no bias")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_return_their_dtype(dtype):
    gen = torch.Generator().manual_seed(4)
    img = torch.randn(16, 8, generator=gen).to(dtype).requires_grad_()
    txt = torch.randn(16, 8, generator=gen).to(dtype).requires_grad_()
    loss = mk.siglip_loss(img, txt, 10.0, -10.0, backend="cpu")
    loss.backward()
    assert loss.dtype == dtype and img.grad.dtype == dtype and txt.grad.dtype == dtype
    want = reference.siglip_loss(img.detach().double(), txt.detach().double(), 10.0, -10.0)
    assert_rel_close(loss.double(), want, 2e-2, "loss")


# --------------------------------------------------------------------------------------------
# Bad inputs, the NaN policy, the drop-in's options
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument():
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    cases = [
        ((img, torch.randn(4, 5), 10.0), ValueError, "same width"),
        ((img, torch.randn(3, 3), 10.0), ValueError, "at least as many rows"),
        ((torch.randn(0, 3), txt, 10.0), ValueError, "at least 1 row"),
        ((img, txt.double(), 10.0), TypeError, "same dtype"),
        ((img.long(), txt.long(), 10.0), TypeError, "image_features must have a floating"),
        ((img[0], txt, 10.0), ValueError, "image_features must be 2-D"),
        ((img, txt, torch.ones(2)), ValueError, "logit_scale must be a scalar"),
        ((img, txt, -1.0), ValueError, "logit_scale"),
        ((img, txt, 10.0, torch.ones(2)), ValueError, "logit_bias must be a scalar"),
        ((img, txt, 10.0, torch.tensor(1)), TypeError, "logit_bias must have a floating"),
        ((img, txt, 10.0, float("nan")), ValueError, "logit_bias must be finite"),
        ((img, txt, 10.0, "x"), TypeError, "logit_bias"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            mk.siglip_loss(*args, backend="torch")
    with pytest.raises(ValueError, match="reduction"):
        mk.siglip_loss(img, txt, 10.0, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        mk.siglip_loss(img, txt, 10.0, backend="tpu")


def test_nan_policy():
    """The package's policy (docs/math.md#validation-and-host-synchronisation): NaN/Inf propagate
    by default and with validate=False (no host synchronisation), validate="full" raises."""
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    img[1, 2] = float("nan")
    with pytest.raises(ValueError, match="image_features contains 1 non-finite"):
        mk.siglip_loss(img, txt, 10.0, validate="full")
    for backend in COMPUTE_BACKENDS:  # propagated, never hidden
        for validate in (True, False):
            assert torch.isnan(mk.siglip_loss(img, txt, 10.0, validate=validate,
                                              backend=backend))
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        mk.siglip_loss(txt, txt, 10.0, torch.tensor(float("inf")), validate="full")
    assert not torch.isfinite(mk.siglip_loss(txt, txt, 10.0, torch.tensor(float("inf"))))


def test_dropin_options():
    img, txt = F.normalize(torch.randn(5, 3)), F.normalize(torch.randn(5, 3))
    for dist_impl in (None, "bidir", "shift", "reduce", "gather"):
        loss = mk.SigLipLoss(dist_impl=dist_impl)(img, txt, 10.0, -10.0)
        assert torch.allclose(loss, reference.siglip_loss(img, txt, 10.0, -10.0,
                                                          normalize=False))
    out = mk.SigLipLoss()(img, txt, 10.0, None, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    with pytest.raises(ValueError, match="dist_impl"):
        mk.SigLipLoss(dist_impl="ring")
    with pytest.raises(RuntimeError, match="init_process_group"):
        mk.SigLipLoss(rank=0, world_size=2)(img, txt, 10.0, -10.0)
    # The drop-in does not normalise (the model does), the functional does by default.
    z = 3 * img
    assert not torch.allclose(mk.SigLipLoss()(z, txt, 10.0, -10.0),
                              mk.siglip_loss(z, txt, 10.0, -10.0))


# --------------------------------------------------------------------------------------------
# The compiled Triton kernels, built for an H100 without one
# --------------------------------------------------------------------------------------------

COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from macl_kernels.primitive.backends import triton as TF

def build(kernel, op, consts, warps, stages):
    acc = "fp64" if op == "fp64" else "fp32"
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in ("pos_index_ptr", "self_index_ptr"):
                sig[name] = "*i32"
            else:
                sig[name] = "*" + (op if name in ("anchors_ptr", "candidates_ptr") else acc)
        else:
            sig[name] = "i32"
    return triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))

# bf16 on tensor cores (float16 differs only by its tf32 weight GEMM, the same helper as the LSE
# kernels'), fp32 at D = 512 (the largest register footprint); four compiles keep it short.
for op, bd, (bm, bn, warps, stages) in [("bf16", 128, (64, 64, 4, 2)),
                                        ("fp32", 512, (32, 32, 8, 1))]:
    flags = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HAS_SELF=False, HAS_BIAS=True,
                 DOT_PRECISION="ieee", UPCAST=False)
    build(TF.KERNELS["softplus_forward"].function, op, dict(ACC_E=True, **flags), warps, stages)
    build(TF.KERNELS["softplus_candidates"].function, op, dict(WIDE_WEIGHTS=op == "fp16", **flags),
          warps, stages)
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="the GPU runs the compiled kernels for real")
def test_softplus_kernels_compile_for_h100_without_a_gpu(tmp_path):
    """The interpreter checks the math, not the compiled path's typing or layouts: compile both
    softplus kernels for sm_90 (bf16, fp32 at D = 512) with Triton's ptxas."""
    import os
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# The custom op with the softplus reduction: opcheck and torch.compile
# --------------------------------------------------------------------------------------------


def _softplus_op_args(backend, with_bias):
    gen = torch.Generator().manual_seed(9)
    device = backend_device(backend)
    anchors, candidates = unit_rows(6, 5, gen).to(device), unit_rows(9, 5, gen).to(device)
    inv_temp = (1 + 5 * torch.rand(6, generator=gen, dtype=torch.float64)).to(device)
    row_bias = torch.randn(6, generator=gen, dtype=torch.float64).to(device) if with_bias else None
    pos = torch.randint(0, 9, (6,), generator=gen).to(device)
    leaves = [t.requires_grad_() if t is not None else None
              for t in (anchors, candidates, inv_temp, row_bias)]
    return (backend, leaves[0], leaves[1], leaves[2], pos, (pos + 1) % 9, int(LogitMap.SCALED),
            0.0, 0.0, None, True, int(SOFTPLUS), leaves[3])


@pytest.mark.slow  # opcheck runs every check of torch.library (seconds per backend)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_softplus(backend):
    for with_bias in (True, False):
        torch.library.opcheck(_ops.negative_lse_op, _softplus_op_args(backend, with_bias))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    img, txt = torch.randn(10, 6, generator=gen), torch.randn(13, 6, generator=gen)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)

    def f(i, x, s, c):
        return mk.siglip_loss(i, x, s, c, backend=backend, validate=False)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    want = four_grads(f, img, txt, t, b)
    got = four_grads(compiled, img, txt, t, b)
    for what, g, w in zip(["loss", "d image", "d text", "d scale", "d bias"], got, want):
        assert_rel_close(g, w, 1e-6, what)
