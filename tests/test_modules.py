"""The drop-in modules against the formulas of the libraries they replace.

lightly and OpenCLIP are not installed (nor imported): their loss formulas are transcribed below,
small and literal, and every module is checked against them in float64 for the loss and the
gradients (z and logit_scale), on both compute backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from conftest import (
    COMPUTE_BACKENDS, F64_RTOL, assert_rel_close, assert_same_results, loss_and_grads, make_pair,
    rel_err,
)
from macl_kernels import reference as R

LIGHTLY_EPS = 1e-8

# --------------------------------------------------------------------------------------------
# Transcribed library formulas (float64, full matrices)
# --------------------------------------------------------------------------------------------


def lightly_ntxent(out0, out1, temperature=0.5):
    """lightly.loss.NTXentLoss.forward, memory_bank_size=0, one process."""
    out0 = F.normalize(out0, dim=1)
    out1 = F.normalize(out1, dim=1)
    n = out0.shape[0]
    diag_mask = torch.eye(n, dtype=torch.bool)
    logits_00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
    logits_01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
    logits_10 = torch.einsum("nc,mc->nm", out1, out0) / temperature
    logits_11 = torch.einsum("nc,mc->nm", out1, out1) / temperature
    logits_00 = logits_00[~diag_mask].view(n, -1)
    logits_11 = logits_11[~diag_mask].view(n, -1)
    logits_0100 = torch.cat([logits_01, logits_00], dim=1)
    logits_1011 = torch.cat([logits_10, logits_11], dim=1)
    logits = torch.cat([logits_0100, logits_1011], dim=0)
    labels = torch.arange(n).repeat(2)
    return F.cross_entropy(logits, labels)


def lightly_macl(z0, z1, temperature=0.1, alpha=0.5, A_0=0.0, eps=LIGHTLY_EPS,
                 return_stats=False):
    """lightly.loss.MACLLoss.forward (``eps`` is lightly's 1e-8 in ``1 / (1 - P + eps)``)."""
    z0 = F.normalize(z0, dim=-1)
    z1 = F.normalize(z1, dim=-1)
    n = z0.shape[0]
    out = torch.cat([z0, z1], dim=0)
    cov = out @ out.T
    ones = torch.ones(2 * n, dtype=torch.bool)
    keep = ~(torch.diag(ones) | torch.diag(ones[n:], n) | torch.diag(ones[n:], -n))
    neg = cov[keep].view(2 * n, -1)
    pos = torch.cat([torch.diag(cov, n), torch.diag(cov, -n)])
    A = torch.mean(pos.detach())
    t = temperature * (1 + alpha * (A - A_0))
    logits = torch.cat([pos.view(-1, 1), neg], dim=1) / t
    log_prob = F.log_softmax(logits, dim=1)
    P = torch.exp(log_prob[:, 0])
    V = 1.0 / (1.0 - P + eps)
    loss = (-V.detach() * log_prob[:, 0]).mean()
    return (loss, t, A) if return_stats else loss


def lightly_dcl(out0, out1, temperature=0.1, weight_fn=None):
    """lightly.loss.DCLLoss.forward (>= 1.5.21), one process."""
    out0 = F.normalize(out0, dim=1)
    out1 = F.normalize(out1, dim=1)

    def one_direction(out0, out1, out0_all, out1_all):
        n = out0.shape[0]
        diag_mask = torch.eye(n, dtype=torch.bool)
        sim_00 = torch.einsum("nc,mc->nm", out0, out0_all) / temperature
        sim_01 = torch.einsum("nc,mc->nm", out0, out1_all) / temperature
        positive_loss = -sim_01[diag_mask]
        if weight_fn:
            positive_loss = positive_loss * weight_fn(out0, out1)
        sim_00 = sim_00[~diag_mask].view(n, -1)
        sim_01 = sim_01[~diag_mask].view(n, -1)
        negative_loss = torch.logsumexp(torch.cat([sim_00, sim_01], dim=1), dim=1)
        return (positive_loss + negative_loss).mean()

    return 0.5 * (one_direction(out0, out1, out0, out1) + one_direction(out1, out0, out1, out0))


def lightly_negative_mises_fisher_weights(out0, out1, sigma=0.5):
    """lightly.loss.dcl_loss.negative_mises_fisher_weights."""
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return 2 - out0.shape[0] * F.softmax(similarity, dim=0)


def lightly_dclw(out0, out1, temperature=0.1, sigma=0.5):
    return lightly_dcl(out0, out1, temperature,
                       weight_fn=lambda a, b: lightly_negative_mises_fisher_weights(a, b, sigma))


def openclip_clip(image_features, text_features, logit_scale, output_dict=False):
    """open_clip.loss.ClipLoss.forward, world_size=1 (no normalisation inside)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0])
    loss = (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2
    return {"contrastive_loss": loss} if output_dict else loss


# --------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------

SHAPES = [(2, 3), (5, 4), (9, 17)]


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_ntxent_matches_lightly(temperature, n, d, backend):
    z0, z1 = make_pair(n, d, seed=n * d)
    got = loss_and_grads(mk.NTXentLoss(temperature, backend=backend), z0, z1)
    want = loss_and_grads(lambda a, b: lightly_ntxent(a, b, temperature), z0, z1)
    assert_same_results(got, want, F64_RTOL)


def test_ntxent_defaults_match_lightly():
    crit = mk.NTXentLoss()
    assert crit.temperature == 0.5 and crit.memory_bank_size == 0
    assert crit.gather_distributed is False
    z0, z1 = make_pair(5, 4, seed=1)
    assert crit(z0, z1).item() == pytest.approx(lightly_ntxent(z0, z1).item(), rel=1e-12)


MACL_PARAMS = [
    dict(), dict(temperature=0.2, alpha=0.0, A_0=0.0),
    dict(temperature=0.05, alpha=1.0, A_0=0.3), dict(temperature=0.5, alpha=0.25, A_0=1.0),
]


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("params", MACL_PARAMS, ids=["defaults", "alpha0", "alpha1", "A0_1"])
def test_macl_matches_lightly(params, n, d, backend):
    z0, z1 = make_pair(n, d, seed=n + d)
    crit = mk.MACLLoss(**params, backend=backend)
    got = loss_and_grads(crit, z0, z1)
    # Exactly (float64 rounding) lightly's formula with its 1e-8 in V taken out (docs/math.md#macl).
    exact = loss_and_grads(lambda a, b: lightly_macl(a, b, eps=0.0, **params), z0, z1)
    assert_same_results(got, exact, F64_RTOL)
    # lightly's own formula, 1e-8 included, differs by about 1e-8 / (1 - P_ap): to 1e-6 where
    # every 1 - P_ap >= 1e-2 (where it is smaller docs/math.md#macl, not lightly's epsilon, is followed).
    if _lightly_min_one_minus_p(z0, z1, **params) >= 1e-2:
        lightly = loss_and_grads(lambda a, b: lightly_macl(a, b, **params), z0, z1)
        assert_same_results(got, lightly, 1e-6)
    # last_temperature / last_alignment: detached 0-d tensors equal to lightly's t and A.
    _, t, A = lightly_macl(z0, z1, return_stats=True, **params)
    crit(z0, z1)
    for got_stat, want in ((crit.last_temperature, t), (crit.last_alignment, A)):
        assert isinstance(got_stat, torch.Tensor) and got_stat.dim() == 0
        assert not got_stat.requires_grad
        assert got_stat.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-15)


def _lightly_min_one_minus_p(z0, z1, temperature=0.1, alpha=0.5, A_0=0.0):
    """min over anchors of 1 - P_ap in lightly's MACL (computed stably, as sigmoid(x_a))."""
    u = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    S = u @ u.T
    pos_index = (torch.arange(2 * n) + n) % (2 * n)
    pos = S[torch.arange(2 * n), pos_index]
    t = temperature * (1 + alpha * (pos.mean() - A_0))
    excluded = torch.eye(2 * n, dtype=torch.bool)
    excluded[torch.arange(2 * n), pos_index] = True
    x = torch.logsumexp((S / t).masked_fill(excluded, float("-inf")), dim=1) - pos / t
    return torch.sigmoid(x).min().item()


def test_macl_matches_lightly_where_eps_is_negligible():
    """Positives far from certain: lightly's formula as is (1e-8 included) agrees to 1e-6."""
    z0, z1 = make_pair(8, 6, seed=3)
    params = dict(temperature=0.5, alpha=0.5, A_0=0.0)
    assert _lightly_min_one_minus_p(z0, z1, **params) >= 1e-2
    for backend in COMPUTE_BACKENDS:
        got = loss_and_grads(mk.MACLLoss(**params, backend=backend), z0, z1)
        lightly = loss_and_grads(lambda a, b: lightly_macl(a, b, **params), z0, z1)
        assert_same_results(got, lightly, 1e-6)


def test_macl_module_defaults_match_lightly():
    crit = mk.MACLLoss()
    assert (crit.temperature, crit.alpha, crit.A_0) == (0.1, 0.5, 0.0)
    assert crit.last_temperature is None and crit.last_alignment is None


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
def test_macl_near_duplicates_follow_spec_not_lightly_eps(backend):
    """Positives that are near-duplicates at a low temperature: 1 - P ~ 1e-13 << 1e-8. Our MACL
    keeps the exact reweighting (loss >= 1, gradient = DCL's at tau(A)); lightly's 1e-8 shrinks
    V and brings back the gradient reduction MACL is meant to remove."""
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(8, 64, generator=g, dtype=torch.float64)
    z1 = z0 + 1e-4 * torch.randn(8, 64, generator=g, dtype=torch.float64)
    params = dict(temperature=0.02, alpha=0.5, A_0=0.0)
    assert _lightly_min_one_minus_p(z0, z1, **params) < 1e-12
    crit = mk.MACLLoss(**params, backend=backend)
    ours = loss_and_grads(crit, z0, z1)
    tau = crit.last_temperature.item()
    dcl = loss_and_grads(lambda a, b: mk.dcl_loss(a, b, temperature=tau, backend=backend), z0, z1)
    assert_same_results(ours[1:], dcl[1:], F64_RTOL, names=("dz0", "dz1"))
    # The exact value, (1 + e^-x) softplus(x) per anchor (no cancellation), is just above 1.
    u = F.normalize(torch.cat([z0, z1]), dim=1)
    S, m = u @ u.T, 16
    pos_index = (torch.arange(m) + 8) % m
    excluded = torch.eye(m, dtype=torch.bool)
    excluded[torch.arange(m), pos_index] = True
    x = (torch.logsumexp((S / tau).masked_fill(excluded, float("-inf")), dim=1)
         - S[torch.arange(m), pos_index] / tau)
    exact = ((1 + torch.exp(-x)) * torch.logaddexp(x, torch.zeros_like(x))).mean()
    assert ours[0].item() == pytest.approx(exact.item(), rel=1e-12)
    assert 1.0 <= exact.item() < 1 + 1e-9
    lightly = loss_and_grads(lambda a, b: lightly_macl(a, b, **params), z0, z1)
    assert ours[0].item() >= 1.0
    assert lightly[0].item() < 0.1  # V ~ 1e8 instead of ~1e12: the loss collapses below 1
    assert rel_err(lightly[1], ours[1]) > 0.5  # the gradient is (mostly) gone


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_dcl_matches_lightly(temperature, n, d, backend):
    z0, z1 = make_pair(n, d, seed=3 * n + d)
    got = loss_and_grads(mk.DCLLoss(temperature, backend=backend), z0, z1)
    want = loss_and_grads(lambda a, b: lightly_dcl(a, b, temperature), z0, z1)
    assert_same_results(got, want, F64_RTOL)


WEIGHT_FNS = {
    "symmetric_detached": lambda a, b: (a * b).sum(1).detach() + 1.5,
    "asymmetric": lambda a, b: (1.0 + 0.3 * a[:, 0] - 0.7 * b[:, -1]).detach(),
    "with_gradient": lambda a, b: 1.0 + (a * b).sum(1) ** 2,
    "scalar": lambda a, b: 0.75,
}


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES[1:])
@pytest.mark.parametrize("wname", sorted(WEIGHT_FNS))
def test_dcl_weight_fn_matches_lightly(wname, n, d, backend):
    weight_fn = WEIGHT_FNS[wname]
    z0, z1 = make_pair(n, d, seed=5 * n + d)
    got = loss_and_grads(mk.DCLLoss(0.2, weight_fn=weight_fn, backend=backend), z0, z1)
    want = loss_and_grads(lambda a, b: lightly_dcl(a, b, 0.2, weight_fn=weight_fn), z0, z1)
    assert_same_results(got, want, F64_RTOL)


def test_dcl_weight_fn_second_direction_is_swapped():
    """The second view's anchors get weight_fn(out1, out0): with an asymmetric weight_fn the
    swapped call (weight_fn(out0, out1) for both views) gives a different loss."""
    weight_fn = WEIGHT_FNS["asymmetric"]
    z0, z1 = make_pair(6, 5, seed=7)
    ours = mk.DCLLoss(0.2, weight_fn=weight_fn)(z0, z1)
    u0, u1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    right = torch.cat([weight_fn(u0, u1), weight_fn(u1, u0)])
    wrong = torch.cat([weight_fn(u0, u1), weight_fn(u0, u1)])
    assert ours.item() == pytest.approx(mk.dcl_loss(z0, z1, temperature=0.2,
                                                    weights=right).item(), rel=1e-12)
    assert abs(ours.item() - mk.dcl_loss(z0, z1, temperature=0.2, weights=wrong).item()) > 1e-3


def test_dcl_weight_fn_sees_normalised_views():
    seen = []

    def weight_fn(a, b):
        seen.append((a.norm(dim=1), b.norm(dim=1)))
        return torch.ones(a.shape[0], dtype=a.dtype)

    z0, z1 = make_pair(4, 3, seed=8, scale=7.0)
    mk.DCLLoss(weight_fn=weight_fn)(z0, z1)
    assert len(seen) == 2
    for na, nb in seen:
        torch.testing.assert_close(na, torch.ones_like(na), rtol=0, atol=1e-12)
        torch.testing.assert_close(nb, torch.ones_like(nb), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature,sigma", [(0.1, 0.5), (0.3, 0.2)])
def test_dclw_matches_lightly(temperature, sigma, n, d, backend):
    z0, z1 = make_pair(n, d, seed=11 * n + d)
    got = loss_and_grads(mk.DCLWLoss(temperature, sigma, backend=backend), z0, z1)
    want = loss_and_grads(lambda a, b: lightly_dclw(a, b, temperature, sigma), z0, z1)
    assert_same_results(got, want, F64_RTOL)


def test_dclw_defaults_match_lightly():
    crit = mk.DCLWLoss()
    assert (crit.temperature, crit.sigma) == (0.1, 0.5)
    assert mk.DCLLoss().temperature == 0.1


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("scale", [1 / 0.07, 2.5])
@pytest.mark.parametrize("prenormalised", [True, False])
def test_clip_matches_openclip(prenormalised, scale, n, d, backend):
    z0, z1 = make_pair(n, d, seed=13 * n + d, scale=0.5)
    if prenormalised:
        z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    logit_scale = torch.tensor(scale, dtype=torch.float64)
    crit = mk.ClipLoss(backend=backend)
    got = loss_and_grads(crit, z0, z1, logit_scale=logit_scale)
    want = loss_and_grads(openclip_clip, z0, z1, logit_scale=logit_scale)
    assert_same_results(got, want, F64_RTOL)
    # A float scale works too.
    assert crit(z0, z1, scale).item() == pytest.approx(want[0].item(), rel=1e-12)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
def test_clip_output_dict(backend):
    z0, z1 = make_pair(5, 4, seed=14)
    logit_scale = torch.tensor(10.0, dtype=torch.float64)
    out = mk.ClipLoss(backend=backend)(z0, z1, logit_scale, output_dict=True)
    assert isinstance(out, dict) and set(out) == {"contrastive_loss"}
    want = openclip_clip(z0, z1, logit_scale, output_dict=True)["contrastive_loss"]
    assert out["contrastive_loss"].item() == pytest.approx(want.item(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Constructor arguments (lightly's checks) and keywords
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e-9), dict(temperature=0.0), dict(alpha=-0.1), dict(alpha=1.1),
    dict(A_0=-0.1), dict(A_0=1.1),
])
def test_macl_constructor_rejects_like_lightly(kwargs):
    with pytest.raises(ValueError):
        mk.MACLLoss(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(alpha=0.0), dict(alpha=1.0), dict(A_0=0.0),
                                    dict(A_0=1.0), dict(alpha=1.0, A_0=1.0)])
def test_macl_constructor_accepts_boundaries(kwargs):
    crit = mk.MACLLoss(**kwargs)
    z0, z1 = make_pair(4, 3, seed=15)
    assert torch.isfinite(crit(z0, z1))


def test_macl_module_alpha1_a0_1_anti_aligned_hits_floor():
    """lightly accepts alpha=1, A_0=1; anti-aligned views would give tau < 0 (docs/math.md#macl)."""
    z0, _ = make_pair(5, 4, seed=16)
    crit = mk.MACLLoss(alpha=1.0, A_0=1.0)
    loss = crit(z0, -z0)
    assert torch.isfinite(loss) and loss.item() >= 1
    assert crit.last_temperature.item() == mk.MACL_TEMPERATURE_FLOOR


def test_ntxent_constructor():
    with pytest.raises(ValueError):
        mk.NTXentLoss(temperature=0)
    with pytest.raises(ValueError):
        mk.NTXentLoss(temperature=1e-9)
    with pytest.raises(ValueError, match="non-negative"):
        mk.NTXentLoss(memory_bank_size=(-1, 16))
    with pytest.warns(UserWarning, match="feature dimension"):
        assert mk.NTXentLoss(memory_bank_size=128).uses_memory_bank
    assert mk.NTXentLoss(memory_bank_size=(128, 16)).bank.shape == (128, 16)


MODULE_FACTORIES = {
    "MACLLoss": lambda **kw: mk.MACLLoss(**kw),
    "NTXentLoss": lambda **kw: mk.NTXentLoss(**kw),
    "DCLLoss": lambda **kw: mk.DCLLoss(**kw),
    "DCLWLoss": lambda **kw: mk.DCLWLoss(**kw),
    "ClipLoss": lambda **kw: mk.ClipLoss(**kw),
}


def _call(name, crit, z0, z1):
    return crit(z0, z1, 1 / 0.07) if name == "ClipLoss" else crit(z0, z1)


@pytest.mark.parametrize("name", sorted(MODULE_FACTORIES))
def test_modules_accept_backend_keyword(name):
    z0, z1 = make_pair(5, 4, seed=17)
    values = {b: _call(name, MODULE_FACTORIES[name](backend=b), z0, z1).item()
              for b in ("auto", "reference", "torch")}
    assert values["auto"] == pytest.approx(values["reference"], rel=1e-12)
    assert values["torch"] == pytest.approx(values["reference"], rel=1e-12)
    with pytest.raises(ValueError, match="backend"):
        MODULE_FACTORIES[name](backend="nope")
    assert isinstance(MODULE_FACTORIES[name](), torch.nn.Module)


@pytest.mark.parametrize("name", ["NTXentLoss", "DCLLoss", "DCLWLoss"])
def test_gather_distributed_without_process_group_is_local(name):
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    z0, z1 = make_pair(5, 4, seed=18)
    on = loss_and_grads(MODULE_FACTORIES[name](gather_distributed=True), z0, z1)
    off = loss_and_grads(MODULE_FACTORIES[name](gather_distributed=False), z0, z1)
    assert_same_results(on, off, 0.0)


def test_functional_gather_distributed_without_process_group_is_local():
    z0, z1 = make_pair(5, 4, seed=19)
    for fn in (mk.macl_loss, mk.infonce_loss, mk.dcl_loss, mk.tfree_loss):
        assert fn(z0, z1, gather_distributed=True).item() == fn(z0, z1).item()
    assert mk.clip_loss(z0, z1, 3.0, gather_distributed=True).item() == \
        mk.clip_loss(z0, z1, 3.0).item()


def test_modules_are_stateless_across_calls():
    """Calling a module twice on the same inputs gives the same loss (no hidden state besides
    MACLLoss's logging attributes)."""
    z0, z1 = make_pair(5, 4, seed=20)
    for name, make in MODULE_FACTORIES.items():
        crit = make()
        assert _call(name, crit, z0, z1).item() == _call(name, crit, z0, z1).item()


def test_modules_on_hand_case(hand_case):
    z0, z1 = hand_case
    assert mk.NTXentLoss(0.5)(z0, z1).item() == pytest.approx(0.870713757057, abs=1e-9)
    assert mk.DCLLoss(0.1)(z0, z1).item() == pytest.approx(-0.185283610927, abs=1e-9)
    assert mk.MACLLoss()(z0, z1).item() == pytest.approx(1.5129776851, abs=1e-9)
    assert mk.ClipLoss()(z0, z1, 1 / 0.07).item() == pytest.approx(0.055843912904, abs=1e-9)
    # The reference agrees with the transcriptions on it as well.
    assert R.macl_loss(z0, z1).item() == pytest.approx(lightly_macl(z0, z1, eps=0.0).item(),
                                                       rel=1e-12)
    assert_rel_close(R.infonce_loss(z0, z1, temperature=0.5), lightly_ntxent(z0, z1), 1e-12)
