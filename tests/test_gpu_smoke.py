"""The first-contact GPU smoke tests (bench/gpu/gpu_first_contact.sh runs this file first on a
GPU): one case per precision class and kernel path of the Triton backend, the widths at the edge
of the shape tables, the width refusal, a float64 case at the artanh clamp and a candidate bank
whose row offsets pass 2^31. The grid is kept small on purpose: every distinct (kernel, flags,
BLOCK_D, dtype) is one Triton compile on a machine where time is short, and
``test_smoke_grid_compiles_few_specialisations`` (runs everywhere) keeps the count under
``MAX_SMOKE_SPECIALISATIONS``. The full GPU grids live in test_triton_backend.py,
test_primitive.py and test_cuda_backend.py (bench/gpu/gpu_staged_checks.sh).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot be "
                                     "tested")

import macl_kernels as mk  # noqa: E402
from conftest import (  # noqa: E402
    assert_same_results, loss_and_grads, loss_case, make_pair,
)
from macl_kernels.tools.cases import LABEL_CASES, TOLERANCES, tolerance  # noqa: E402
from macl_kernels.primitive.protocol import LogitMap, Problem  # noqa: E402
from macl_kernels.primitive.backends import resolve_backend  # noqa: E402
from macl_kernels.primitive.backends import triton as TF  # noqa: E402
from macl_kernels.primitive.backends.triton import backend as TB  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")

# First contact compiles every specialisation once (~2-5 s each): keep the stage short.
MAX_SMOKE_SPECIALISATIONS = 40

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}

# (loss, layout, dtype, D, float32 matmul precision): per precision class the three kernel paths
# (MACL 2n: symmetric backward; CLIP: both directions from one tile; tfree: the ARTANH map), the
# widest width of each table (bf16 at CLIP ViT-L's D = 768, float32 3xTF32 at 128 with E, tf32
# at 512).
SMOKE_CASES = (
    [(name, layout, dtype, 128, "highest")
     for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
     for name, layout in (("macl", "2n"), ("clip", "cross_sym"), ("tfree", "2n"))]
    + [("infonce", "cross", torch.bfloat16, 128, "highest"),
       ("infonce", "cross", torch.float32, 128, "highest"),
       ("macl", "2n", torch.float32, 512, "high"),
       ("clip", "cross_sym", torch.bfloat16, 768, "highest"),
       ("macl", "2n", torch.bfloat16, 768, "highest")]
    # SigLIP's softplus pair and the label mask (forward and candidates with HAS_LABELS)
    + [("siglip", "cross", torch.bfloat16, 128, "highest"),
       ("infonce_labels", "2n", torch.bfloat16, 128, "highest")]
)


def _ids(case):
    name, layout, dtype, d, precision = case
    return f"{name}-{layout}-{_DTYPE_NAMES[dtype]}-D{d}" + ("-tf32" if precision == "high" else "")


def _with_matmul_precision(precision, fn, *args, **kwargs):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_float32_matmul_precision(previous)


def _run_case(case, device, n=None, backend="triton"):
    name, layout, dtype, d, precision = case
    n = n or (1000 if d <= 256 else 600)  # not a multiple of any tile
    if name in LABEL_CASES:  # fixed labels, layout as given
        fn, kw = LABEL_CASES[name].fn, dict(LABEL_CASES[name].kwargs, layout=layout)
    else:
        fn, kw = loss_case(name, layout)
    z1, z2 = make_pair(n, d, seed=d, dtype=dtype)
    return z1, z2, fn, kw, _with_matmul_precision(
        precision, loss_and_grads, fn, z1.to(device), z2.to(device), reduction="none",
        backend=backend, **kw)


@gpu
@pytest.mark.parametrize("case", SMOKE_CASES, ids=[_ids(c) for c in SMOKE_CASES])
def test_smoke_against_reference(case):
    z1, z2, fn, kw, got = _run_case(case, torch.device("cuda"))
    want = loss_and_grads(fn, z1.cuda().double(), z2.cuda().double(), reduction="none",
                          backend="reference", **kw)
    dtype_name = _DTYPE_NAMES[case[2]]
    # float32 at the default matmul precision (3xTF32) is held to float32's own bound; tf32,
    # when the user allows it, to the triton backend's tf32 bound (docs/math.md#tolerances).
    tol = TOLERANCES[dtype_name] if case[4] == "highest" else tolerance("triton", dtype_name)
    assert_same_results([t.cpu() for t in got], [t.cpu() for t in want], tol)


@gpu
def test_float64_artanh_at_the_clamp():
    """Identical views put S at exactly +-1, where the ARTANH map clamps to 1 - artanh_eps:
    float64 must keep that bound in float64 (it reaches the kernels as a tensor)."""
    fn, kw = loss_case("tfree", "2n")
    z1, _ = make_pair(200, 64, seed=3, dtype=torch.float64)
    got = loss_and_grads(fn, z1.cuda(), z1.cuda(), reduction="none", backend="triton", **kw)
    want = loss_and_grads(fn, z1.cuda(), z1.cuda(), reduction="none", backend="reference", **kw)
    assert_same_results([t.cpu() for t in got], [t.cpu() for t in want],
                        tolerance("triton", "float64"))


@gpu
def test_width_without_a_shape_is_refused_and_auto_passes_over_it():
    z = torch.randn(64, 768, device="cuda")
    with pytest.raises(ValueError, match="D = 768"):
        mk.macl_loss(z, z.flip(0), backend="triton")
    assert resolve_backend("auto", z.device, 768, torch.float32) != "triton"
    assert resolve_backend("auto", z.device, 768, torch.bfloat16) == "triton"


@gpu
def test_candidate_offsets_past_2_to_the_31():
    """A candidate bank of 2^31 / 128 + 64 rows at D = 128 (8 GiB of float32): row x stride
    passes 2^31 elements, which 32-bit offsets would wrap. The forward against a chunked
    float64 check of the last rows' contribution."""
    d, m = 128, 64
    k = 2 ** 31 // d + 64
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2 ** 30:  # the bank, and a float64 chunk of it with its logits
        pytest.skip(f"needs ~16 GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(0)
    candidates = torch.empty(k, d, device="cuda")
    candidates.normal_(generator=g)
    candidates = torch.nn.functional.normalize(candidates, dim=1, out=candidates)
    anchors = torch.nn.functional.normalize(torch.randn(m, d, device="cuda", generator=g), dim=1)
    # Make the last rows dominate: anchor a's best negative sits beyond row 2^31 / d.
    candidates[-m:] = anchors
    pos_index = torch.zeros(m, dtype=torch.int64, device="cuda")
    inv_temp = torch.full((m,), 10.0, device="cuda")
    problem = Problem(anchors, candidates, inv_temp, pos_index, None, LogitMap.SCALED,
                      operand_dtype=torch.float32)
    lse_neg, _ = TF.BACKEND.fwd(problem, need_grad=False)
    want = torch.full((m,), float("-inf"), dtype=torch.float64, device="cuda")
    for start in range(1, k, 2 ** 22):  # row 0 is every anchor's positive
        block = candidates[start:start + 2 ** 22].double()
        logits = 10.0 * anchors.double() @ block.T
        want = torch.logaddexp(want, torch.logsumexp(logits, dim=1))
    assert torch.allclose(lse_neg.double(), want, rtol=1e-4, atol=1e-4), \
        (lse_neg[:4], want[:4])


def test_smoke_grid_compiles_few_specialisations(monkeypatch):
    """Counted without running anything: every launch the smoke cases make is recorded (kernel,
    precision, BLOCK_D and flags: what a compile is keyed on) instead of executed."""
    seen = set()

    def record(name, grid_rows, args, precision, **flags):
        flags.pop("UPCAST", None)  # an interpreter-only switch
        flags.pop("shape", None)  # the both-directions forward's fixed shape: not a compile key
        seen.add((name, precision, tuple(sorted(flags.items()))))

    monkeypatch.setattr(TB, "launch", record)
    monkeypatch.setattr(TF.TritonBackend, "_shape_refusal", staticmethod(lambda *a: None))
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if TF.unavailable_reason(device) is not None:
        pytest.skip(TF.unavailable_reason(device))
    for case in SMOKE_CASES:
        _run_case(case, device, n=20)
    # the float64 clamp case and the 2^31 bank (forward only, cross, no E)
    seen.add(("forward", "fp64", "artanh"))
    seen.add(("forward", "fp32", "bank"))
    assert 10 < len(seen) <= MAX_SMOKE_SPECIALISATIONS, sorted(map(str, seen))
