"""Property-based tests (hypothesis): random shapes, input scales, temperatures, options and
backends against the float64 reference. The example budget is bounded and the search is
derandomised, so CI is fast and reproducible."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # pinned in requirements-dev.txt: always present
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import macl_kernels as mk  # noqa: E402
from conftest import heavy_on_interpreter, loss_and_grads, rel_err  # noqa: E402

BACKENDS = [b for b in ("torch", "cpu", "triton") if mk.available_backends("cpu")[b] is None]
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


def _close(got, want, tol, what):
    for name, a, b in zip(("loss", "dz1", "dz2", "dscale"), got, want):
        err = rel_err(a, b)
        assert math.isfinite(err) and err <= tol, f"{what}: {name} relative error {err:.2e}"


@st.composite
def problems(draw):
    n = draw(st.integers(2, 12))
    # D >= 2: normalised D = 1 rows have an identically zero input gradient, so a relative
    # error would divide rounding noise by rounding noise (test_hardening covers D = 1).
    d = draw(st.integers(2, 20))
    seed = draw(st.integers(0, 2**16))
    log_scale = draw(st.floats(-3, 3))  # inputs from 1e-3 to 1e3: normalisation must not care
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = draw(st.sampled_from([0.01, 0.3, 1.0, 3.0]))  # near-duplicates to unrelated views
    z1 = (base + noise * torch.randn(n, d, generator=g, dtype=torch.float64)) * 10**log_scale
    z2 = (base + noise * torch.randn(n, d, generator=g, dtype=torch.float64)) * 10**log_scale
    return z1, z2


LOSS_STRATEGIES = st.one_of(
    st.builds(lambda t, layout: (mk.infonce_loss, dict(temperature=t, layout=layout)),
              st.floats(0.02, 2.0), st.sampled_from(["2n", "cross", "cross_sym"])),
    st.builds(lambda t, w, s, layout: (mk.dcl_loss, dict(temperature=t, weighted=w, sigma=s,
                                                          layout=layout)),
              st.floats(0.02, 2.0), st.booleans(), st.floats(0.1, 2.0),
              st.sampled_from(["2n", "cross", "cross_sym"])),
    st.builds(lambda t, a, a0, sched, mode, rw, layout: (
        mk.macl_loss, dict(temperature=t, alpha=a, a0=a0, schedule=sched, temperature_mode=mode,
                           reweight=rw, layout=layout)),
        st.floats(0.02, 1.0), st.floats(0.05, 2.0), st.floats(-0.5, 0.5),
        st.sampled_from(["linear", "exp"]), st.sampled_from(["batch", "anchor"]), st.booleans(),
        st.sampled_from(["2n", "cross", "cross_sym"])),
    st.builds(lambda c, layout: (mk.tfree_loss, dict(scale=c, layout=layout)),
              st.floats(0.5, 4.0), st.sampled_from(["2n", "cross", "cross_sym"])),
    st.builds(lambda s: (mk.clip_loss, dict(logit_scale=s)), st.floats(1.0, 100.0)),
)


@pytest.mark.parametrize("backend", heavy_on_interpreter(BACKENDS))
@PROPERTY_SETTINGS
@given(problem=problems(), loss=LOSS_STRATEGIES,
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_backend_matches_reference(backend, problem, loss, reduction):
    z1, z2 = problem
    fn, kw = loss
    if backend == "triton" and z1.shape[0] > 6:
        z1, z2 = z1[:6], z2[:6]  # the interpreter is slow: small problems only
    got = loss_and_grads(fn, z1, z2, backend=backend, reduction=reduction, **kw)
    want = loss_and_grads(fn, z1, z2, backend="reference", reduction=reduction, **kw)
    _close(got, want, 1e-9, f"{fn.__name__} {kw} {reduction}")


@PROPERTY_SETTINGS
@given(problem=problems(), t=st.floats(0.02, 2.0))
def test_infonce_bounds(problem, t):
    """0 <= -log P_ap <= (2/t) + log(M - 1) with |S| <= 1, for every anchor."""
    z1, z2 = problem
    per_anchor = mk.infonce_loss(z1, z2, temperature=t, reduction="none", backend="reference")
    m = per_anchor.numel()
    assert bool((per_anchor >= 0).all())
    assert bool((per_anchor <= 2 / t + math.log(m - 1) + 1e-9).all())


@pytest.mark.parametrize("backend", heavy_on_interpreter(BACKENDS))
@PROPERTY_SETTINGS
@given(problem=problems(), perm_seed=st.integers(0, 1000))
def test_permuting_the_batch_permutes_the_per_anchor_losses(backend, problem, perm_seed):
    """Relabelling the pairs relabels the losses: no backend depends on the row order."""
    z1, z2 = problem
    n = z1.shape[0]
    if backend == "triton" and n > 6:
        z1, z2, n = z1[:6], z2[:6], 6
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    base = mk.infonce_loss(z1, z2, reduction="none", backend=backend)
    permuted = mk.infonce_loss(z1[perm], z2[perm], reduction="none", backend=backend)
    assert rel_err(permuted, torch.cat([base[:n][perm], base[n:][perm]])) <= 1e-12
