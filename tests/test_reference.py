"""The reference oracle and the public API against the closed forms of docs/math.md
(#macl, #dcl-and-dclw, #tolerances),
reduction semantics, autograd correctness (gradcheck) and the MACL / DCLW properties."""

from __future__ import annotations

import math

import pytest
import torch

import macl_kernels as mk
from conftest import (
    COMPUTE_BACKENDS, F64_RTOL, LAYOUT_LOSSES, LAYOUTS, LOSS_CASES, REDUCTIONS,
    assert_rel_close, assert_same_results, loss_and_grads, loss_case, make_pair, num_anchors,
    rel_err,
)
from macl_kernels import reference as R

HAND_ATOL = 1e-9

# --------------------------------------------------------------------------------------------
# docs/math.md#tolerances: the hand case z1 = [[1,0],[0,1]], z2 = [[.8,.6],[.6,.8]]
# --------------------------------------------------------------------------------------------

HAND_VALUES = {
    "infonce": (dict(temperature=0.5, layout="2n"), 0.870713757057),
    "dcl": (dict(temperature=0.1, layout="2n"), -0.185283610927),
    "macl": (dict(), 1.5129776851),
    "tfree": (dict(layout="2n"), 1.185871279994),
    "clip": (dict(logit_scale=1 / 0.07), 0.055843912904),
}
REFERENCE_FNS = {
    "infonce": R.infonce_loss, "dcl": R.dcl_loss, "macl": R.macl_loss, "tfree": R.tfree_loss,
    "clip": R.clip_loss,
}
PUBLIC_FNS = {
    "infonce": mk.infonce_loss, "dcl": mk.dcl_loss, "macl": mk.macl_loss, "tfree": mk.tfree_loss,
    "clip": mk.clip_loss,
}


@pytest.mark.parametrize("name", sorted(HAND_VALUES))
def test_hand_case_reference_module(hand_case, name):
    kw, want = HAND_VALUES[name]
    got = REFERENCE_FNS[name](*hand_case, **kw)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, abs=HAND_ATOL)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS + ("auto",))
@pytest.mark.parametrize("name", sorted(HAND_VALUES))
def test_hand_case_public(hand_case, name, backend):
    kw, want = HAND_VALUES[name]
    got = PUBLIC_FNS[name](*hand_case, backend=backend, **kw)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, abs=HAND_ATOL)


def test_hand_case_macl_temperature(hand_case):
    loss, tau, alignment = R.macl_loss(*hand_case, return_stats=True)
    assert loss.item() == pytest.approx(1.5129776851, abs=HAND_ATOL)
    assert alignment.item() == pytest.approx(0.8, abs=1e-12)
    assert tau.item() == pytest.approx(0.14, abs=1e-12)
    assert not tau.requires_grad and not alignment.requires_grad


def test_hand_case_macl_module_stats(hand_case):
    crit = mk.MACLLoss()
    assert crit(*hand_case).item() == pytest.approx(1.5129776851, abs=HAND_ATOL)
    assert crit.last_temperature.item() == pytest.approx(0.14, abs=1e-12)
    assert crit.last_alignment.item() == pytest.approx(0.8, abs=1e-12)


# --------------------------------------------------------------------------------------------
# docs/math.md#tolerances: equal similarities
# --------------------------------------------------------------------------------------------


def equal_similarity_value(name: str, layout: str, n: int) -> float:
    """The closed form of each loss when every similarity (positive or negative) is equal."""
    candidates = 2 * n - 1 if layout == "2n" else n  # |C(a)|
    if name in ("infonce", "macl_noreweight", "tfree", "clip"):
        return math.log(candidates)
    if name in ("dcl", "dclw"):  # DCLW: equal alignments give w = 2 - N / N = 1
        return math.log(candidates - 1)
    if name.startswith("macl"):  # V = 1 / (1 - 1/|C|)
        return candidates / (candidates - 1) * math.log(candidates)
    raise AssertionError(name)


def equal_similarity_inputs(kind: str, n: int, d: int = 4):
    g = torch.Generator().manual_seed(n)
    if kind == "ones":
        return torch.ones(n, d, dtype=torch.float64), torch.ones(n, d, dtype=torch.float64)
    row = torch.randn(1, d, generator=g, dtype=torch.float64)
    if kind == "repeated_row":  # z1 = z2 = the same row, rescaled per row (normalisation)
        scales = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5
        return row * scales, row.repeat(n, 1)
    if kind == "two_rows":  # z1 rows all a, z2 rows all b: every cross similarity is a.b
        other = torch.randn(1, d, generator=g, dtype=torch.float64)
        return row.repeat(n, 1), other.repeat(n, 1)
    raise AssertionError(kind)


EQUAL_CASES = (
    [(name, layout) for name in LAYOUT_LOSSES for layout in LAYOUTS] + [("clip", "cross_sym")]
)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("name,layout", EQUAL_CASES)
def test_equal_similarity_closed_forms(name, layout, n, reduction, backend):
    kinds = ["ones", "repeated_row"]
    if layout != "2n":
        kinds.append("two_rows")  # only cross layouts see a single common value here
    fn, kw = loss_case(name, layout)
    want = equal_similarity_value(name, layout, n)
    m = num_anchors(n, layout)
    for kind in kinds:
        z1, z2 = equal_similarity_inputs(kind, n)
        got = fn(z1, z2, reduction=reduction, backend=backend, **kw)
        if reduction == "none":
            expected = torch.full((m,), want, dtype=torch.float64)
        else:
            expected = torch.tensor(want * (m if reduction == "sum" else 1), dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12,
                                   msg=lambda s: f"{kind}: {s}")


def test_equal_similarity_spec_formulas_literal():
    # The exact expressions of docs/math.md#tolerances, independent of the helper above.
    for n in (2, 5):
        z = torch.ones(n, 3, dtype=torch.float64)
        assert mk.infonce_loss(z, z).item() == pytest.approx(math.log(2 * n - 1), abs=1e-12)
        assert mk.infonce_loss(z, z, layout="cross").item() == pytest.approx(math.log(n), abs=1e-12)
        assert mk.dcl_loss(z, z).item() == pytest.approx(math.log(2 * n - 2), abs=1e-12)
        assert mk.macl_loss(z, z).item() == pytest.approx(
            (2 * n - 1) / (2 * n - 2) * math.log(2 * n - 1), abs=1e-12)


# --------------------------------------------------------------------------------------------
# Every loss x layout: reduction semantics, dtypes (the values against the reference:
# test_losses.py)
# --------------------------------------------------------------------------------------------

ALL_CASES = [(name, layout) for name in LAYOUT_LOSSES for layout in LAYOUTS] + [("clip", None)]


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("name,layout", ALL_CASES)
def test_reduction_semantics(name, layout, backend):
    n = 5
    z1, z2 = make_pair(n, 4, seed=4)
    fn, kw = loss_case(name, layout or "2n")
    none = fn(z1, z2, reduction="none", backend=backend, **kw)
    m = num_anchors(n, layout or "cross_sym")
    assert none.shape == (m,)
    total = fn(z1, z2, reduction="sum", backend=backend, **kw)
    mean = fn(z1, z2, reduction="mean", backend=backend, **kw)
    assert total.shape == () and mean.shape == ()
    assert total.item() == pytest.approx(none.sum().item(), rel=1e-12, abs=1e-12)
    assert mean.item() == pytest.approx(none.mean().item(), rel=1e-12, abs=1e-12)
    # The default reduction is the mean.
    assert fn(z1, z2, backend=backend, **kw).item() == pytest.approx(mean.item(), rel=1e-14)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("loss_name", ["infonce", "dcl", "macl", "tfree"])
def test_cross_sym_rows_then_columns(loss_name, backend):
    """cross_sym's "none" output is the N row anchors (cross on (z1, z2)), then the N column
    anchors (cross on (z2, z1))."""
    z1, z2 = make_pair(4, 3, seed=5)
    fn, kw = loss_case(loss_name, "cross_sym")
    kw.pop("layout")
    if loss_name == "macl":  # the batch temperature uses the mean over all anchors: same A here
        kw["alpha"] = 0.0
    sym = fn(z1, z2, layout="cross_sym", reduction="none", backend=backend, **kw)
    rows = fn(z1, z2, layout="cross", reduction="none", backend=backend, **kw)
    cols = fn(z2, z1, layout="cross", reduction="none", backend=backend, **kw)
    assert_rel_close(sym, torch.cat([rows, cols]), F64_RTOL)


def test_clip_is_infonce_cross_sym():
    z1, z2 = make_pair(5, 3, seed=6)
    for backend in COMPUTE_BACKENDS:
        clip = mk.clip_loss(z1, z2, 1 / 0.2, reduction="none", backend=backend)
        nce = mk.infonce_loss(z1, z2, temperature=0.2, layout="cross_sym", reduction="none",
                              backend=backend)
        assert_rel_close(clip, nce, F64_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_output_dtype_is_input_dtype(name, backend, dtype):
    z1, z2 = make_pair(4, 3, seed=7, dtype=dtype)
    fn, kw = loss_case(name, "2n")
    for reduction in REDUCTIONS:
        out = loss_and_grads(fn, z1, z2, reduction=reduction, backend=backend, **kw)
        for t in out:
            assert t.dtype == dtype
            assert torch.isfinite(t).all()


# --------------------------------------------------------------------------------------------
# gradcheck of the reference (float64, small N)
# --------------------------------------------------------------------------------------------

GC_N, GC_D = 4, 3


def _gc_inputs(seed: int = 11):
    z1, z2 = make_pair(GC_N, GC_D, seed=seed)
    return z1.requires_grad_(True), z2.requires_grad_(True)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["infonce", "dcl", "tfree", "macl_fixed_tau"])
def test_gradcheck_plain_losses(name, layout, reduction):
    """Losses without stop-gradients: autograd of the oracle matches finite differences."""
    fns = {
        "infonce": lambda a, b: R.infonce_loss(a, b, temperature=0.3, layout=layout,
                                               reduction=reduction),
        "dcl": lambda a, b: R.dcl_loss(a, b, temperature=0.3, layout=layout, reduction=reduction),
        "tfree": lambda a, b: R.tfree_loss(a, b, layout=layout, reduction=reduction),
        # alpha = 0 and no reweighting: tau is the constant t0, nothing is stop-gradient.
        "macl_fixed_tau": lambda a, b: R.macl_loss(a, b, temperature=0.3, alpha=0.0,
                                                   reweight=False, layout=layout,
                                                   reduction=reduction),
    }
    assert torch.autograd.gradcheck(fns[name], _gc_inputs())


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_infonce_normalize_flag(normalize):
    fn = lambda a, b: R.infonce_loss(a, b, temperature=0.7, normalize=normalize,  # noqa: E731
                                     reduction="none")
    assert torch.autograd.gradcheck(fn, _gc_inputs(12))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_clip_with_logit_scale(reduction):
    z1, z2 = _gc_inputs(13)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, s: R.clip_loss(a, b, s, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z1, z2, scale))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_dcl_with_weights_carrying_gradient(layout):
    z1, z2 = _gc_inputs(14)
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(num_anchors(GC_N, layout), generator=g, dtype=torch.float64) + 0.5)
    fn = lambda a, b, w: R.dcl_loss(a, b, temperature=0.4, layout=layout, weights=w,  # noqa
                                    reduction="none")
    assert torch.autograd.gradcheck(fn, (z1, z2, w.requires_grad_(True)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_dclw_frozen_weights(layout):
    """DCLW's weights are stop-gradient: its gradient is that of DCL with the weights frozen at
    the current point, and that surrogate passes gradcheck."""
    z1, z2 = _gc_inputs(15)
    u1, u2 = (torch.nn.functional.normalize(z.detach(), dim=1) for z in (z1, z2))
    w = 2 - GC_N * torch.softmax((u1 * u2).sum(1) / 0.5, dim=0)
    w = w if layout == "cross" else torch.cat([w, w])
    surrogate = lambda a, b: R.dcl_loss(a, b, temperature=0.4, layout=layout,  # noqa: E731
                                        weights=w, reduction="none")
    assert torch.autograd.gradcheck(surrogate, (z1, z2))
    got = loss_and_grads(R.dcl_loss, z1, z2, temperature=0.4, layout=layout, weighted=True,
                         reduction="none")
    want = loss_and_grads(surrogate, z1, z2)
    assert_same_results(got, want, F64_RTOL)


MACL_GC_CASES = [
    dict(),
    dict(temperature_mode="anchor"),
    dict(schedule="exp", alpha=2.0),
    dict(temperature_mode="anchor", schedule="exp", alpha=2.0),
    dict(reweight=False),
    dict(temperature_mode="anchor", reweight=False),
]


def _macl_frozen_surrogate(z1, z2, layout, kw):
    """MACL with its stop-gradient quantities (tau(A), V) frozen at (z1, z2), written with
    InfoNCE at a fixed temperature: ``sum_a V*_a * (-log P_ap(tau*_a))`` per anchor."""
    loss, tau, _ = R.macl_loss(z1.detach(), z2.detach(), layout=layout, reduction="none",
                               return_stats=True, **kw)
    m = loss.shape[0]
    taus = tau.expand(m) if tau.dim() == 0 else tau
    if kw.get("reweight", True):
        # V_a = 1 / (1 - P_ap) with -log P_ap the InfoNCE loss of anchor a at its tau_a.
        V = torch.stack([
            1 / -torch.expm1(-R.infonce_loss(z1.detach(), z2.detach(), temperature=float(t),
                                             layout=layout, reduction="none")[a])
            for a, t in enumerate(taus)
        ])
    else:
        V = torch.ones(m, dtype=torch.float64)

    def surrogate(a, b):
        return torch.stack([
            V[i] * R.infonce_loss(a, b, temperature=float(t), layout=layout, reduction="none")[i]
            for i, t in enumerate(taus)
        ])

    return surrogate, loss


@pytest.mark.slow  # float64 gradcheck of 18 MACL variants: ~4 s
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(len(MACL_GC_CASES)))
def test_gradcheck_macl_frozen_stop_gradients(case, layout):
    """MACL's A (hence tau) and V are stop-gradient. Its reference gradient must equal the
    gradient of the surrogate with those frozen (which passes gradcheck), and its value must
    equal the surrogate's value at the point itself."""
    kw = MACL_GC_CASES[case]
    z1, z2 = _gc_inputs(16)
    surrogate, value = _macl_frozen_surrogate(z1, z2, layout, kw)
    assert torch.autograd.gradcheck(surrogate, (z1, z2))
    assert_rel_close(surrogate(z1, z2).detach(), value, F64_RTOL, "value")
    got = loss_and_grads(R.macl_loss, z1, z2, layout=layout, reduction="none", **kw)
    want = loss_and_grads(surrogate, z1, z2)
    assert_same_results(got, want, F64_RTOL)


# --------------------------------------------------------------------------------------------
# MACL properties (docs/math.md#macl)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["batch", "anchor"])
def test_macl_per_anchor_at_least_one(layout, mode, backend):
    for seed in range(4):
        z1, z2 = make_pair(6, 5, seed=seed)
        for temperature in (0.05, 0.1, 1.0):
            per_anchor = mk.macl_loss(z1, z2, temperature=temperature, temperature_mode=mode,
                                      layout=layout, reduction="none", backend=backend)
            assert (per_anchor >= 1).all(), per_anchor.min().item()


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_macl_near_duplicate_positives_tend_to_one(layout, backend):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 16, generator=g, dtype=torch.float64)
    z2 = z1 + 1e-4 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    per_anchor = mk.macl_loss(z1, z2, temperature=0.02, layout=layout, reduction="none",
                              backend=backend)
    assert (per_anchor >= 1).all()
    assert (per_anchor - 1).max().item() < 1e-6
    _, tau, alignment = R.macl_loss(z1, z2, temperature=0.02, layout=layout, return_stats=True)
    assert alignment.item() == pytest.approx(1.0, abs=1e-6)
    assert tau.item() == pytest.approx(0.03, abs=1e-6)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("macl_kw", [dict(), dict(temperature=0.05, alpha=0.3, a0=0.2),
                                     dict(schedule="exp", alpha=2.0)],
                         ids=["defaults", "linear", "exp"])
def test_macl_gradient_is_dcl_gradient_at_adaptive_temperature(macl_kw, layout, reduction,
                                                               backend):
    z1, z2 = make_pair(6, 5, seed=21)
    _, tau, _ = R.macl_loss(z1, z2, layout=layout, return_stats=True, **macl_kw)
    macl = loss_and_grads(mk.macl_loss, z1, z2, layout=layout, reduction=reduction,
                          backend=backend, **macl_kw)
    dcl = loss_and_grads(mk.dcl_loss, z1, z2, temperature=tau.item(), layout=layout,
                         reduction=reduction, backend=backend)
    assert_same_results(macl[1:], dcl[1:], F64_RTOL, names=("dz1", "dz2"))


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_macl_gradient_is_dcl_gradient_near_duplicates(layout, backend):
    """Where 1 - P_ap is tiny (1e-13) the gradient still has the full -1/tau on the positive."""
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(8, 16, generator=g, dtype=torch.float64)
    z2 = z1 + 1e-4 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    _, tau, _ = R.macl_loss(z1, z2, temperature=0.02, layout=layout, return_stats=True)
    macl = loss_and_grads(mk.macl_loss, z1, z2, temperature=0.02, layout=layout, backend=backend)
    dcl = loss_and_grads(mk.dcl_loss, z1, z2, temperature=tau.item(), layout=layout,
                         backend=backend)
    assert_same_results(macl[1:], dcl[1:], F64_RTOL, names=("dz1", "dz2"))


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_macl_without_reweight_is_infonce_at_adaptive_temperature(layout, reduction, backend):
    z1, z2 = make_pair(6, 5, seed=22)
    _, tau, _ = R.macl_loss(z1, z2, layout=layout, return_stats=True)
    macl = loss_and_grads(mk.macl_loss, z1, z2, reweight=False, layout=layout,
                          reduction=reduction, backend=backend)
    nce = loss_and_grads(mk.infonce_loss, z1, z2, temperature=tau.item(), layout=layout,
                         reduction=reduction, backend=backend)
    assert_same_results(macl, nce, F64_RTOL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["batch", "anchor"])
def test_macl_linear_temperature_rule(mode, layout):
    z1, z2 = make_pair(5, 4, seed=23)
    u1, u2 = (torch.nn.functional.normalize(z, dim=1) for z in (z1, z2))
    pos = (u1 * u2).sum(1)
    pos = pos if layout == "cross" else torch.cat([pos, pos])
    A = pos.mean() if mode == "batch" else pos
    _, tau, alignment = R.macl_loss(z1, z2, temperature=0.2, alpha=0.4, a0=0.1,
                                    temperature_mode=mode, layout=layout, return_stats=True)
    torch.testing.assert_close(alignment, A, rtol=0, atol=1e-13)
    torch.testing.assert_close(tau, 0.2 * (1 + 0.4 * (A - 0.1)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_macl_exp_schedule(layout, backend):
    z1, z2 = make_pair(5, 4, seed=24)
    u1, u2 = (torch.nn.functional.normalize(z, dim=1) for z in (z1, z2))
    A = (u1 * u2).sum(1).mean()  # every pair appears equally often in every layout
    _, tau, alignment = R.macl_loss(z1, z2, schedule="exp", alpha=2.0, temperature=0.1,
                                    layout=layout, return_stats=True)
    assert alignment.item() == pytest.approx(A.item(), abs=1e-13)
    assert tau.item() == pytest.approx(0.1 * 2.0 ** A.item(), abs=1e-13)
    # The public loss runs at that temperature: without reweighting it is InfoNCE at tau.
    got = mk.macl_loss(z1, z2, schedule="exp", alpha=2.0, reweight=False, layout=layout,
                       backend=backend)
    want = mk.infonce_loss(z1, z2, temperature=0.1 * 2.0 ** A.item(), layout=layout,
                           backend=backend)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["batch", "anchor"])
def test_macl_temperature_floor(mode, layout, backend):
    """alpha = 1, A0 = 1 (accepted by lightly) and anti-aligned views: tau = t0 * A < 0 would
    flip sign; it is clamped at MACL_TEMPERATURE_FLOOR and the loss stays finite."""
    assert mk.MACL_TEMPERATURE_FLOOR == 1e-3
    z1, _ = make_pair(5, 4, seed=25)
    z2 = -z1
    _, tau, alignment = R.macl_loss(z1, z2, alpha=1.0, a0=1.0, temperature_mode=mode,
                                    layout=layout, return_stats=True)
    assert torch.allclose(alignment, torch.full_like(alignment, -1.0), atol=1e-12)
    assert torch.all(tau == mk.MACL_TEMPERATURE_FLOOR)
    out = loss_and_grads(mk.macl_loss, z1, z2, alpha=1.0, a0=1.0, temperature_mode=mode,
                         layout=layout, reduction="none", backend=backend)
    for t in out:
        assert torch.isfinite(t).all()
    assert (out[0] >= 1).all()
    # It is exactly the loss at tau = floor: reweight=False equals InfoNCE at 1e-3.
    nce = mk.infonce_loss(z1, z2, temperature=1e-3, layout=layout, reduction="none",
                          backend=backend)
    plain = mk.macl_loss(z1, z2, alpha=1.0, a0=1.0, temperature_mode=mode, reweight=False,
                         layout=layout, reduction="none", backend=backend)
    assert_rel_close(plain, nce, F64_RTOL)


def test_macl_temperature_floor_below_t0():
    """A t0 below the floor is not raised to it: the clamp is at min(floor, t0)."""
    z1, z2 = make_pair(4, 3, seed=26)
    _, tau, _ = R.macl_loss(z1, z2, temperature=1e-4, alpha=0.0, return_stats=True)
    assert tau.item() == pytest.approx(1e-4, rel=1e-12)


# --------------------------------------------------------------------------------------------
# DCLW weights (docs/math.md#dcl-and-dclw)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sigma", [0.5, 0.2])
def test_dclw_weights(sigma, layout, reduction, backend):
    n = 6
    z1, z2 = make_pair(n, 5, seed=27)
    u1, u2 = (torch.nn.functional.normalize(z, dim=1) for z in (z1, z2))
    w = 2 - n * torch.softmax((u1 * u2).sum(1) / sigma, dim=0)
    w_rows = w if layout == "cross" else torch.cat([w, w])  # the same w_i for both views
    assert not torch.allclose(w, torch.ones_like(w))  # the test is not vacuous
    weighted = loss_and_grads(mk.dcl_loss, z1, z2, weighted=True, sigma=sigma, layout=layout,
                              reduction=reduction, backend=backend)
    explicit = loss_and_grads(mk.dcl_loss, z1, z2, weights=w_rows, layout=layout,
                              reduction=reduction, backend=backend)
    assert_same_results(weighted, explicit, F64_RTOL)


def test_dcl_weights_helper_has_no_gradient():
    z1, z2 = make_pair(5, 3, seed=28)
    u1 = torch.nn.functional.normalize(z1, dim=1).requires_grad_(True)
    u2 = torch.nn.functional.normalize(z2, dim=1).requires_grad_(True)
    w = R.dcl_weights(u1, u2, 0.5)
    assert not w.requires_grad
    want = 2 - 5 * torch.softmax((u1 * u2).sum(1).detach() / 0.5, dim=0)
    torch.testing.assert_close(w, want, rtol=0, atol=1e-14)


def test_dclw_differs_from_dcl():
    z1, z2 = make_pair(6, 5, seed=29)
    a = loss_and_grads(mk.dcl_loss, z1, z2, weighted=True)
    b = loss_and_grads(mk.dcl_loss, z1, z2)
    assert rel_err(a[1], b[1]) > 1e-3
