"""Argument checking of every public entry point: each bad call fails at the call site with an
error that names the argument, on every backend; unusable backends say why; zero rows work."""

from __future__ import annotations

import math

import pytest
import torch

import macl_kernels as mk
from conftest import F64_RTOL, LAYOUTS, assert_same_results, loss_and_grads, make_pair

BACKENDS = ("reference", "torch", "auto")
FUNCTIONS = ("macl_loss", "infonce_loss", "clip_loss", "dcl_loss", "tfree_loss")
ARG_NAMES = {"clip_loss": ("image_features", "text_features")}


def call(fname, z1, z2, **kw):
    """Call a public loss with valid defaults for everything but what the test passes."""
    fn = getattr(mk, fname)
    if fname == "clip_loss":
        return fn(z1, z2, kw.pop("logit_scale", 1 / 0.07), **kw)
    return fn(z1, z2, **kw)


def names(fname):
    return ARG_NAMES.get(fname, ("z1", "z2"))


@pytest.fixture
def good():
    return make_pair(4, 3, seed=0)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname", FUNCTIONS)
def test_mismatched_shapes(fname, backend):
    z1 = torch.randn(4, 3, dtype=torch.float64)
    z2 = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        call(fname, z1, z2, backend=backend)
    msg = str(info.value)
    assert "(4, 3)" in msg and "(5, 3)" in msg
    assert all(name in msg for name in names(fname))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        call(fname, z1, torch.randn(4, 2, dtype=torch.float64), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname", FUNCTIONS)
@pytest.mark.parametrize("shape", [(4,), (2, 4, 3), ()])
@pytest.mark.parametrize("which", [0, 1])
def test_wrong_number_of_dimensions(fname, backend, shape, which):
    zs = list(make_pair(4, 3))
    zs[which] = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=names(fname)[which]):
        call(fname, *zs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname", FUNCTIONS)
def test_single_row(fname, backend):
    """A batch of one row leaves every anchor without a negative: a structural error of the
    functional API (the drop-ins return their peers' value instead, test_dropin_fidelity.py)."""
    z1, z2 = make_pair(1, 3)
    with pytest.raises(ValueError, match="no negative"):
        call(fname, z1, z2, backend=backend)
    with pytest.raises(ValueError, match="at least 1 row"):
        call(fname, z1[:0], z2[:0], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtype(fname, backend, dtype):
    z = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(TypeError, match=names(fname)[0]):
        call(fname, z, z, backend=backend)
    with pytest.raises(TypeError, match=names(fname)[1]):
        call(fname, torch.ones(4, 3), z, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname", FUNCTIONS)
def test_different_dtypes(fname, backend, good):
    z1, z2 = good
    with pytest.raises(TypeError, match="same dtype") as info:
        call(fname, z1, z2.float(), backend=backend)
    assert "float64" in str(info.value) and "float32" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname", FUNCTIONS)
@pytest.mark.parametrize("bad", [[[1.0, 0.0], [0.0, 1.0]], None, 3.0],
                         ids=["list", "None", "float"])
def test_non_tensor_input(fname, backend, bad, good):
    z1, z2 = good
    with pytest.raises(TypeError, match=names(fname)[0]):
        call(fname, bad, z2, backend=backend)
    with pytest.raises(TypeError, match=names(fname)[1]):
        call(fname, z1, bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname", FUNCTIONS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [0, 1])
def test_non_finite_inputs(fname, backend, value, which, good):
    """validate="full" refuses NaN/Inf with a clear error; the default (and validate=False)
    propagates them into a non-finite loss, as PyTorch's losses do (GradScaler relies on it)."""
    zs = [z.clone() for z in good]
    zs[which][1, 2] = value
    with pytest.raises(ValueError, match=names(fname)[which]) as info:
        call(fname, *zs, backend=backend, validate="full")
    assert "non-finite" in str(info.value)
    for validate in (True, False):
        out = call(fname, *zs, backend=backend, validate=validate)
        assert isinstance(out, torch.Tensor) and not torch.isfinite(out)


# --------------------------------------------------------------------------------------------
# Scalars and choices
# --------------------------------------------------------------------------------------------

TEMPERATURE_ARG = {"macl_loss": "temperature", "infonce_loss": "temperature",
                   "dcl_loss": "temperature", "tfree_loss": "scale", "clip_loss": "logit_scale"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname", FUNCTIONS)
@pytest.mark.parametrize("value,error", [
    (0.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("0.1", TypeError), (None, TypeError), (True, TypeError),
])
def test_bad_temperature(fname, backend, value, error, good):
    arg = TEMPERATURE_ARG[fname]
    with pytest.raises(error, match=arg):
        call(fname, *good, backend=backend, **{arg: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname,arg,value,error", [
    ("dcl_loss", "sigma", 0.0, ValueError),
    ("dcl_loss", "sigma", "x", TypeError),
    ("dcl_loss", "weighted", 1, TypeError),
    ("macl_loss", "alpha", float("nan"), ValueError),
    ("macl_loss", "alpha", "0.5", TypeError),
    ("macl_loss", "a0", float("inf"), ValueError),
    ("macl_loss", "reweight", "yes", TypeError),
    ("tfree_loss", "eps", 0.0, ValueError),
    ("tfree_loss", "eps", 1.0, ValueError),
    ("tfree_loss", "eps", -1e-3, ValueError),
    ("tfree_loss", "eps", 1.5, ValueError),
    ("tfree_loss", "scale", -2.0, ValueError),
    ("infonce_loss", "normalize", "no", TypeError),
    ("infonce_loss", "validate", 0, TypeError),
    ("infonce_loss", "validate", "yes", TypeError),
    ("infonce_loss", "validate", None, TypeError),
    ("infonce_loss", "gather_distributed", None, TypeError),
])
def test_bad_scalar_arguments(fname, arg, value, error, backend, good):
    with pytest.raises(error, match=arg):
        call(fname, *good, backend=backend, **{arg: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_macl_exp_schedule_needs_positive_alpha(backend, good):
    with pytest.raises(ValueError, match="alpha"):
        mk.macl_loss(*good, schedule="exp", alpha=0.0, backend=backend)
    with pytest.raises(ValueError, match="alpha"):
        mk.macl_loss(*good, schedule="exp", alpha=-2.0, backend=backend)


CHOICES = [(fname, "layout") for fname in FUNCTIONS if fname != "clip_loss"] + [
    (fname, "reduction") for fname in FUNCTIONS] + [
    ("macl_loss", "schedule"), ("macl_loss", "temperature_mode")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname,arg", CHOICES)
@pytest.mark.parametrize("value", ["bogus", "", None, 2])
def test_unknown_choice(fname, arg, value, backend, good):
    with pytest.raises(ValueError) as info:
        call(fname, *good, backend=backend, **{arg: value})
    assert arg in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("fname", FUNCTIONS)
@pytest.mark.parametrize("value", ["gpu", "Torch", "", None])
def test_unknown_backend(fname, value, good):
    with pytest.raises(ValueError) as info:
        call(fname, *good, backend=value)
    assert "backend" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value,error", [
    (torch.ones(2, dtype=torch.float64), ValueError),
    (torch.ones(1, 1, dtype=torch.float64), ValueError),
    (torch.tensor([], dtype=torch.float64), ValueError),
    (torch.tensor(5), TypeError),
    (0.0, ValueError), (-1.0, ValueError), ("14.3", TypeError),
])
def test_clip_bad_logit_scale(value, error, backend, good):
    with pytest.raises(error, match="logit_scale"):
        mk.clip_loss(*good, value, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.0, -3.0, float("nan"), float("inf")])
def test_clip_tensor_logit_scale_values_are_data_checks(value, backend, good):
    """A tensor scale's value is data: refused with validate="full" only (a host sync); by
    default it is used as given (a NaN scale gives a NaN loss)."""
    scale = torch.tensor(value, dtype=torch.float64)
    with pytest.raises(ValueError, match="logit_scale"):
        mk.clip_loss(*good, scale, backend=backend, validate="full")
    out = mk.clip_loss(*good, scale, backend=backend)
    assert torch.isfinite(out) == math.isfinite(value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcl_bad_weights(backend, good):
    with pytest.raises(ValueError, match="weights"):
        mk.dcl_loss(*good, weights=torch.ones(4, dtype=torch.float64), backend=backend)  # 2n: 8
    with pytest.raises(TypeError, match="weights"):
        mk.dcl_loss(*good, weights=[1.0] * 8, backend=backend)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def test_available_backends():
    av = mk.available_backends()
    assert set(av) == {"reference", "torch", "triton", "cpu", "cuda"}
    assert av["reference"] is None and av["torch"] is None
    for name, reason in av.items():
        assert reason is None or (isinstance(reason, str) and reason.strip()), name
    assert mk.available_backends("cpu") == mk.available_backends(torch.device("cpu"))


UNUSABLE = [name for name, reason in mk.available_backends().items() if reason is not None]


@pytest.mark.skipif(not UNUSABLE, reason="every backend is usable here")
@pytest.mark.parametrize("backend", UNUSABLE)
@pytest.mark.parametrize("fname", FUNCTIONS)
def test_unusable_backend_says_why(fname, backend, good):
    reason = mk.available_backends(good[0].device)[backend]
    with pytest.raises(RuntimeError) as info:
        call(fname, *good, backend=backend)
    assert reason in str(info.value) and backend in str(info.value)


@pytest.mark.parametrize("backend", UNUSABLE)
def test_modules_with_unusable_backend_fail_at_call(backend, good):
    crit = mk.MACLLoss(backend=backend)  # constructing is fine: the device is not known yet
    with pytest.raises(RuntimeError, match=backend):
        crit(*good)


def test_auto_backend_matches_reference(good):
    for fname in FUNCTIONS:
        auto = call(fname, *good, backend="auto")
        ref = call(fname, *good, backend="reference")
        assert auto.item() == pytest.approx(ref.item(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Zero rows (docs/math.md#reductions-and-normalisation: u = 0, gradient g / eps, never NaN)
# --------------------------------------------------------------------------------------------

ZERO_ROW_CASES = [(f, layout) for f in FUNCTIONS if f != "clip_loss" for layout in LAYOUTS] + [
    ("clip_loss", None)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fname,layout", ZERO_ROW_CASES)
def test_zero_rows(fname, layout, reduction):
    z1, z2 = make_pair(5, 4, seed=1)
    z1[1] = 0.0
    z2[3] = 0.0
    kw = dict(reduction=reduction) if layout is None else dict(reduction=reduction, layout=layout)
    fn = getattr(mk, fname)
    if fname == "clip_loss":
        kw["logit_scale"] = 1 / 0.07
    results = {}
    for backend in ("reference", "torch"):
        results[backend] = loss_and_grads(fn, z1, z2, backend=backend, **kw)
        for t in results[backend]:
            assert torch.isfinite(t).all(), backend
    assert_same_results(results["torch"], results["reference"], F64_RTOL)
    # F.normalize semantics: the zero rows' gradient is dL/du / eps, i.e. huge but finite.
    assert results["reference"][1][1].abs().max() > 1e6


def test_all_rows_zero_is_finite():
    z = torch.zeros(3, 4, dtype=torch.float64)
    for backend in ("reference", "torch"):
        for fname in ("macl_loss", "infonce_loss", "dcl_loss"):
            out = loss_and_grads(getattr(mk, fname), z, z, backend=backend)
            assert all(torch.isfinite(t).all() for t in out), (fname, backend)
        # Every similarity is 0: the equal-similarity closed forms hold.
        assert mk.infonce_loss(z, z, backend=backend).item() == pytest.approx(math.log(5))
