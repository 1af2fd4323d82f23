"""The primitive (docs/math.md#the-primitive) on every kernel backend usable here, through the one
entry point ``macl_kernels.primitive.ops.negative_lse`` (never a backend's internals), against the dense
autograd oracle ``conftest.dense_negative_lse``:

    lse_neg[a] = log sum_{k in Neg(a)} exp(l_ak),  Neg(a) = all k but pos_index[a], self_index[a]

Both logit maps (SCALED, ARTANH), symmetric (``candidates=None``, layout 2n) and cross problems,
with and without ``self_index``; shapes straddling the kernels' tiles (cpu: 256, Triton's
interpreter: 32); float64 and float32 (docs/math.md#tolerances); the gradients wrt anchors,
candidates and ``inv_temp`` under a random upstream gradient, and every subset of inputs requiring
a gradient; the sentinels (an empty Neg(a): ``-inf`` and a zero gradient; S = +-1 under the artanh
map: finite), the argument checks, ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``.

Backend-specific things (tile-size knobs, compiled-kernel builds, GPU-only sizes, extension load
errors) live in the thin ``test_<backend>_backend.py`` files.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import (
    HAS_CUDA, KERNEL_BACKENDS, TOLERANCES, assert_rel_close, backend_device, dense_negative_lse,
)
from macl_kernels.primitive import ops as _ops
from macl_kernels.primitive.protocol import LogitMap

SCALED, ARTANH = LogitMap.SCALED, LogitMap.ARTANH
ARTANH_SCALE, ARTANH_EPS = 2.0, 1e-6
MAPS = [SCALED, ARTANH]
MAP_IDS = ["scaled", "artanh"]
DTYPES = [("float64", torch.float64), ("float32", torch.float32)]



@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Every kernel backend usable here (``conftest.KERNEL_BACKENDS``)."""
    return request.param


def test_every_backend_usable_here_is_tested():
    """torch and cpu always run here; triton under its interpreter (or on a GPU); cuda on a
    GPU."""
    assert {"torch", "cpu"} <= set(KERNEL_BACKENDS)
    assert ("cuda" in KERNEL_BACKENDS) == HAS_CUDA


# --------------------------------------------------------------------------------------------
# Problems and the comparison with the oracle
# --------------------------------------------------------------------------------------------


def make_problem(m, k, d, symmetric, with_self, logit_map, seed):
    """float64 CPU tensors of one problem: ``(anchors, candidates or None, inv_temp or None,
    pos_index, self_index or None)``. Rows are unit vectors (the artanh map's domain)."""
    g = torch.Generator().manual_seed(seed)

    # Under the artanh map, rows of norm 0.9 (|S| <= 0.81) keep its slope c / (1 - S^2) small:
    # near-duplicate unit rows (likely among 300 rows at D = 5) would amplify float32 rounding of S
    # beyond the float32 bound. D = 1 keeps unit rows: every S = +-1, on the clamp (slope 0).
    # S = +-1 among several rows: test_artanh_at_similarity_plus_minus_one.
    norm = 0.9 if (logit_map is ARTANH and d > 1) else 1.0

    def rows(n):
        return norm * torch.nn.functional.normalize(
            torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)

    anchors = rows(m)
    if symmetric:
        candidates = None
        pos_index = (torch.arange(m) + max(1, m // 2)) % m  # the other view's row
        self_index = torch.arange(m) if with_self else None
    else:
        candidates = rows(k)
        pos_index = torch.randint(0, k, (m,), generator=g)
        # A self among the candidates that differs from the positive (when K allows).
        self_index = (pos_index + 1 + torch.randint(0, max(1, k - 1), (m,), generator=g)) % k \
            if with_self else None
    inv_temp = (1 / (0.05 + torch.rand(m, generator=g, dtype=torch.float64))
                if logit_map is SCALED else None)
    return anchors, candidates, inv_temp, pos_index, self_index


def map_kwargs(logit_map):
    return (dict(logit_map=logit_map, artanh_scale=ARTANH_SCALE, artanh_eps=ARTANH_EPS)
            if logit_map is ARTANH else dict(logit_map=logit_map))


def run(fn, tensors, logit_map, dtype, device, grad=(True, True, True), g=None):
    """``fn(anchors, candidates, inv_temp, pos, self, **map)`` on fresh ``dtype`` leaves on
    ``device``; returns ``(lse_neg, [d_anchors, d_candidates, d_inv_temp])`` on the CPU, a
    gradient ``None`` where its input is absent or did not require one. ``g``: the upstream
    gradient (float64, CPU), the ``conftest.upstream_like``-style fixed random one by default."""
    anchors, candidates, inv_temp, pos_index, self_index = tensors
    leaves = []
    for t, wanted in zip((anchors, candidates, inv_temp), grad):
        if t is None:
            leaves.append(None)
            continue
        leaf = t.detach().to(device=device, dtype=dtype)
        leaves.append(leaf.requires_grad_(bool(wanted)))
    out = fn(*leaves, pos_index.to(device),
             None if self_index is None else self_index.to(device), **map_kwargs(logit_map))
    if g is None:
        g = upstream(out.shape[0])
    needing = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, needing, g.to(device=device, dtype=out.dtype))
                 if needing else ())
    result = [next(grads).cpu() if (t is not None and t.requires_grad) else None for t in leaves]
    return out.detach().cpu(), result


def upstream(m, seed=1234):
    """A fixed random upstream gradient with both signs (bfloat16-representable values)."""
    gen = torch.Generator().manual_seed(seed + m)
    return torch.randn(m, generator=gen, dtype=torch.float64).to(torch.bfloat16).double()


def op(backend):
    """The entry point under test, for ``run``."""
    def call(anchors, candidates, inv_temp, pos_index, self_index, **kw):
        return _ops.negative_lse(backend, anchors, candidates, inv_temp, pos_index, self_index,
                                 **kw)
    return call


def check_against_oracle(backend, tensors, logit_map, dtype_name, dtype, grad=(True, True, True),
                         tol=None, oracle_dtype=torch.float64):
    """The op's ``lse_neg`` and gradients against the float64 oracle on the same rounded inputs."""
    tol = TOLERANCES[dtype_name] if tol is None else tol
    rounded = [t if (t is None or not t.is_floating_point()) else t.to(dtype).double()
               for t in tensors]
    got, got_grads = run(op(backend), tensors, logit_map, dtype, backend_device(backend), grad)
    want, want_grads = run(dense_negative_lse, rounded, logit_map, oracle_dtype,
                           torch.device("cpu"), grad)
    assert got.dtype == dtype and got.shape == want.shape
    assert_rel_close(got, want, tol, "lse_neg")
    for name, a, b in zip(("d_anchors", "d_candidates", "d_inv_temp"), got_grads, want_grads):
        assert (a is None) == (b is None), f"{name}: {a is None} vs {b is None}"
        if a is not None:
            assert a.dtype == dtype, name
            assert_rel_close(a, b, tol, name)
    return got, got_grads


# Shapes (M, K, D): tiny, one tile with a ragged edge (33), several ragged tiles each way ("L"),
# rectangular both ways; D = 1 (every normalised S is +-1), D = 5, D = 40. "L" is 300 (the cpu
# kernel's tiles are 256; the cuda kernel's 64) except under Triton's interpreter, whose tiles
# are 32 (and whose every tile costs a Python-level dispatch): 70 there.
CROSS_SHAPES = [(2, 2, 1), (2, 2, 5), (33, 33, 5), (33, 33, 40), (2, 33, 40), (33, 2, 1),
                ("L", "L", 5), (33, "L", 40), ("L", 33, 1)]
SYMMETRIC_SHAPES = [(2, 5), (2, 1), (33, 1), (33, 40), ("L", 5), ("L", 40)]


def large(backend: str) -> int:
    return 70 if (backend == "triton" and not HAS_CUDA) else 300


def _shape_cases():
    cases = []
    for m, k, d in CROSS_SHAPES:
        marks = [pytest.mark.slow] if "L" in (m, k) else []
        cases.append(pytest.param(False, m, k, d, id=f"cross-{m}x{k}x{d}", marks=marks))
    for m, d in SYMMETRIC_SHAPES:
        marks = [pytest.mark.slow] if m == "L" else []
        cases.append(pytest.param(True, m, m, d, id=f"sym-{m}x{d}", marks=marks))
    return cases


@pytest.mark.parametrize("dtype_name,dtype", DTYPES, ids=[n for n, _ in DTYPES])
@pytest.mark.parametrize("with_self", [False, True], ids=["noself", "self"])
@pytest.mark.parametrize("logit_map", MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("symmetric,m,k,d", _shape_cases())
def test_matches_dense_oracle(backend, symmetric, m, k, d, logit_map, with_self, dtype_name,
                              dtype):
    """The multi-tile shapes ("L") are marked slow (Triton's interpreter takes seconds each);
    test_tiles_fast below keeps one multi-tile case per backend in the fast run."""
    m, k = (large(backend) if v == "L" else v for v in (m, k))
    if with_self and k == 2:
        pytest.skip("K = 2 with self and positive excluded leaves Neg(a) empty: "
                    "test_empty_negative_set")
    tensors = make_problem(m, k, d, symmetric, with_self, logit_map, seed=m * 1000 + k + d)
    # With D = 1 every similarity is +-1 and sits on the artanh clamp 1 - 1e-6, which float32
    # rounds to 1 - 1.013e-6: the float32 logit differs from the float64 one by ~1e-4 there, so
    # the oracle is the same dense formula in float32 (the clamped entries' slope is 0 in both).
    oracle_dtype = dtype if (logit_map is ARTANH and d == 1) else torch.float64
    check_against_oracle(backend, tensors, logit_map, dtype_name, dtype,
                         oracle_dtype=oracle_dtype)


@pytest.mark.parametrize("dtype_name,dtype", DTYPES, ids=[n for n, _ in DTYPES])
@pytest.mark.parametrize("m,k,d", [(3, 7, 5), (33, 2, 4), (5, 70, 40)])
def test_no_positive_among_the_candidates(backend, m, k, d, dtype_name, dtype):
    """``pos_index[a] = -1``: ``Neg(a)`` is every candidate (a memory bank, whose positive is
    computed outside). Mixed with rows that do have a positive, K != M, and candidates that need
    no gradient (a bank) as well as ones that do."""
    anchors, candidates, inv_temp, pos_index, _ = make_problem(m, k, d, False, False, SCALED,
                                                               seed=7 * m + k)
    pos_index = torch.where(torch.arange(m) % 2 == 0, torch.full_like(pos_index, -1), pos_index)
    for grad in ((True, True, True), (True, False, True)):
        check_against_oracle(backend, (anchors, candidates, inv_temp, pos_index, None), SCALED,
                             dtype_name, dtype, grad=grad)


@pytest.mark.parametrize("logit_map", MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_tiles_fast(backend, symmetric, logit_map):
    """One multi-tile problem per backend, map and layout in the fast run (float32, self)."""
    m = large(backend)
    tensors = make_problem(m, m + 3, 9, symmetric, True, logit_map, seed=99)
    check_against_oracle(backend, tensors, logit_map, "float32", torch.float32)


# --------------------------------------------------------------------------------------------
# Which gradients are asked for
# --------------------------------------------------------------------------------------------

CROSS_NEEDS = [grad for grad in itertools.product((False, True), repeat=3)]
SYMMETRIC_NEEDS = [(True, False, False), (False, False, True), (True, False, True),
                   (False, False, False)]


@pytest.mark.parametrize("logit_map", MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("symmetric,grad", [(False, g) for g in CROSS_NEEDS]
                         + [(True, g) for g in SYMMETRIC_NEEDS],
                         ids=[f"cross-{''.join('ACT'[i] if x else '_' for i, x in enumerate(g))}"
                              for g in CROSS_NEEDS]
                         + [f"sym-{''.join('UxT'[i] if x else '_' for i, x in enumerate(g))}"
                            for g in SYMMETRIC_NEEDS])
def test_need_flag_subsets(backend, symmetric, grad, logit_map):
    """Only some inputs requiring a gradient: exactly those get one, and it is right (A: anchors,
    C: candidates, T: inv_temp, U: the one tensor of a symmetric problem)."""
    tensors = make_problem(37, 35, 6, symmetric, True, logit_map, seed=7)
    got, got_grads = check_against_oracle(backend, tensors, logit_map, "float64", torch.float64,
                                          grad=grad)
    for t, wanted, gr in zip(tensors[:3], grad, got_grads):
        assert (gr is not None) == (t is not None and wanted)


def test_no_grad_forward(backend):
    """Under ``torch.no_grad`` (and with no input requiring a gradient) the op runs its forward
    only and returns the same values."""
    tensors = make_problem(33, 40, 5, False, True, SCALED, seed=8)
    device = backend_device(backend)
    args = [None if t is None else t.to(device) for t in tensors]
    with torch.no_grad():
        out = _ops.negative_lse(backend, *args)
    assert not out.requires_grad
    want = dense_negative_lse(*tensors)
    assert_rel_close(out.cpu(), want, TOLERANCES["float64"], "lse_neg")


# --------------------------------------------------------------------------------------------
# The symmetric problem: one tensor in both roles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logit_map", MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("m", [6, 70])
def test_symmetric_equals_cross_with_a_copy(backend, m, logit_map):
    """``candidates=None`` (a kernel may compute each off-diagonal tile once for both rows, and
    ``_ops`` folds the two sides of the gradient) against a copy of the same rows passed as
    candidates (the general path): the same lse_neg, dU = dA + dC, the same d_inv_temp."""
    U, _, inv_temp, pos_index, self_index = make_problem(m, m, 17, True, True, logit_map, seed=m)
    device = backend_device(backend)
    g = upstream(m)
    sym, sym_grads = run(op(backend), (U, None, inv_temp, pos_index, self_index), logit_map,
                         torch.float64, device, g=g)
    full, full_grads = run(op(backend), (U, U.clone(), inv_temp, pos_index, self_index),
                           logit_map, torch.float64, device, g=g)
    assert_rel_close(sym, full, 1e-12, "lse_neg")
    assert sym_grads[1] is None
    assert_rel_close(sym_grads[0], full_grads[0] + full_grads[1], 1e-12, "dU")
    if logit_map is SCALED:
        assert_rel_close(sym_grads[2], full_grads[2], 1e-12, "d inv_temp")


# --------------------------------------------------------------------------------------------
# Sentinels: the same conventions in every backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name,dtype", DTYPES, ids=[n for n, _ in DTYPES])
@pytest.mark.parametrize("logit_map", MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("case", ["cross-K1", "cross-mixed", "sym-M2-self", "sym-mixed"])
def test_empty_negative_set(backend, case, logit_map, dtype_name, dtype):
    """A row whose Neg(a) is empty (every candidate is its positive or itself) has
    ``lse_neg = -inf`` (the log of an empty sum) and contributes a zero, finite gradient, whatever
    its upstream gradient; the other rows are unaffected."""
    if case == "cross-K1":  # one candidate, everyone's positive
        tensors = make_problem(5, 1, 4, False, False, logit_map, seed=1)
        empty = torch.ones(5, dtype=torch.bool)
    elif case == "cross-mixed":  # K = 2: rows whose self is the other candidate have Neg empty
        anchors, candidates, inv_temp, _, _ = make_problem(6, 2, 4, False, False, logit_map, 2)
        pos_index = torch.tensor([0, 0, 1, 1, 0, 1])
        self_index = torch.tensor([1, 0, 0, 1, 1, 1])
        tensors = (anchors, candidates, inv_temp, pos_index, self_index)
        empty = pos_index != self_index
    elif case == "sym-M2-self":  # layout 2n with N = 1: the positive and self are all there is
        tensors = make_problem(2, 2, 4, True, True, logit_map, seed=3)
        empty = torch.ones(2, dtype=torch.bool)
    else:  # symmetric, M = 2: row 0 excludes both rows, row 1 only row 0
        U, _, inv_temp, _, _ = make_problem(2, 2, 4, True, True, logit_map, seed=4)
        pos_index = torch.tensor([1, 0])
        self_index = torch.tensor([0, 0])
        tensors = (U, None, inv_temp, pos_index, self_index)
        empty = torch.tensor([True, False])
    m = tensors[0].shape[0]
    g = upstream(m) + 1.0  # non-zero on every row, the empty ones included
    got, got_grads = run(op(backend), tensors, logit_map, dtype, backend_device(backend), g=g)
    assert got.dtype == dtype
    assert torch.equal(torch.isneginf(got), empty), got
    assert torch.isfinite(got[~empty]).all()
    for grad in got_grads:
        assert grad is None or torch.isfinite(grad).all(), got_grads
    # The oracle with the empty rows' upstream gradient zeroed (their lse_neg depends on nothing).
    rounded = [t if (t is None or not t.is_floating_point()) else t.to(dtype).double()
               for t in tensors]
    want, want_grads = run(dense_negative_lse, rounded, logit_map, torch.float64,
                           torch.device("cpu"), g=g.masked_fill(empty, 0.0))
    tol = TOLERANCES[dtype_name]
    if (~empty).any():
        assert_rel_close(got[~empty], want[~empty], tol, "lse_neg of non-empty rows")
    for name, a, b in zip(("d_anchors", "d_candidates", "d_inv_temp"), got_grads, want_grads):
        if a is not None:
            assert_rel_close(a, b, tol, name)
    if empty.all():
        for grad in got_grads:
            assert grad is None or float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("dtype_name,dtype", DTYPES, ids=[n for n, _ in DTYPES])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_artanh_at_similarity_plus_minus_one(backend, symmetric, dtype_name, dtype):
    """Self similarity exactly 1 (excluded) and duplicated / antipodal rows (S = +-1 between
    different rows, clamped): the artanh map's slope is 0 there, never 0 * 1/(1 - 1) = NaN.
    Finite, and equal to the oracle (whose clamp has the same zero slope)."""
    U = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.8, 0.6, 0.0],
                      [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float64)
    m = U.shape[0]
    rows = torch.arange(m)
    pos_index = (rows + 2) % m
    if symmetric:
        tensors = (U, None, None, pos_index, rows)
    else:
        tensors = (U, U.flip(0).clone(), None, pos_index, None)  # the rows again: S = +-1 pairs
    got, got_grads = check_against_oracle(backend, tensors, ARTANH, dtype_name, dtype,
                                          oracle_dtype=dtype)
    assert torch.isfinite(got).all()
    for grad in got_grads:
        assert grad is None or torch.isfinite(grad).all()


def _args(backend, logit_map=SCALED, with_inv_temp=True):
    x = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    x = x.to(backend_device(backend))
    inv_temp = torch.ones(4, dtype=torch.float64, device=x.device) if with_inv_temp else None
    pos = torch.tensor([2, 3, 0, 1], device=x.device)
    return x, inv_temp, pos


@pytest.mark.parametrize("logit_map", [2, -1, 7])
def test_invalid_logit_map_is_refused(backend, logit_map):
    x, inv_temp, pos = _args(backend)
    with pytest.raises(ValueError):
        _ops.negative_lse(backend, x, None, inv_temp, pos, None, logit_map=logit_map)
    # The op itself (what a compiled graph calls) refuses it too, before any kernel runs.
    with pytest.raises(ValueError):
        _ops.negative_lse_op(backend, x, None, inv_temp, pos, None, logit_map, 0.0, 0.0, None,
                             False)


def test_scaled_needs_inv_temp(backend):
    x, _, pos = _args(backend, with_inv_temp=False)
    with pytest.raises(ValueError, match="inv_temp"):
        _ops.negative_lse(backend, x, None, None, pos, None, logit_map=SCALED)


@pytest.mark.parametrize("scale,eps,with_inv_temp", [
    (0.0, 1e-6, False), (-1.0, 1e-6, False), (float("nan"), 1e-6, False), (2.0, 0.0, False),
    (2.0, 1.0, False), (2.0, -1e-3, False), (2.0, 1e-6, True)],
    ids=["scale0", "scale-neg", "scale-nan", "eps0", "eps1", "eps-neg", "with-inv_temp"])
def test_artanh_argument_checks(backend, scale, eps, with_inv_temp):
    x, inv_temp, pos = _args(backend, with_inv_temp=with_inv_temp)
    with pytest.raises(ValueError):
        _ops.negative_lse(backend, x, None, inv_temp, pos, None, logit_map=ARTANH,
                          artanh_scale=scale, artanh_eps=eps)


def test_half_compute_dtype(backend):
    """The losses upcast half inputs to float32 before the primitive; the kernels that compute in
    float32/float64 only refuse a half compute dtype with a TypeError naming it, the torch
    backend computes in the inputs' dtype."""
    x, inv_temp, pos = _args(backend)
    x, inv_temp = x.to(torch.bfloat16), inv_temp.to(torch.bfloat16)
    if backend == "torch":
        out = _ops.negative_lse(backend, x, None, inv_temp, pos, None)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    else:
        with pytest.raises(TypeError, match="float32 or float64"):
            _ops.negative_lse(backend, x, None, inv_temp, pos, None)


# --------------------------------------------------------------------------------------------
# The custom op: opcheck and torch.compile
# --------------------------------------------------------------------------------------------


def _op_samples(backend):
    """Argument tuples of ``macl_kernels::negative_lse`` covering its cases: symmetric with self,
    SCALED and an operand dtype; cross without self, ARTANH and none (opcheck takes ~1-2 s per
    sample)."""
    device = backend_device(backend)
    samples = []
    for i, (symmetric, logit_map) in enumerate([(True, SCALED), (False, ARTANH)]):
        m, k = (8, 8) if symmetric else (6, 9)
        A, C, b, pos, slf = make_problem(m, k, 5, symmetric, i % 2 == 0, logit_map, seed=i)
        A, C, b = (None if t is None else t.to(device).requires_grad_(True) for t in (A, C, b))
        kw = map_kwargs(logit_map)
        samples.append((backend, A, C, b, pos.to(device),
                        None if slf is None else slf.to(device), int(kw["logit_map"]),
                        kw.get("artanh_scale", 0.0), kw.get("artanh_eps", 0.0),
                        torch.float64 if i == 0 else None, True))
    # Both directions (layout cross_sym): M + K entries per anchor tensor.
    A, C, b, pos, _ = make_both_directions_problem(6, 7, 5, SCALED, seed=3)
    A, C, b = (t.to(device).requires_grad_(True) for t in (A, C, b))
    # need_grad, then row_reduction, row_bias, the two labels, need_eqs, both_directions.
    samples.append((backend, A, C, b, pos.to(device), None, int(SCALED), 0.0, 0.0, None, True,
                    0, None, None, None, False, True))
    return samples


@pytest.mark.slow  # opcheck runs every check of torch.library (seconds per backend)
def test_opcheck(backend):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT
    dispatch of the custom op, on every case of the primitive."""
    for args in _op_samples(backend):
        torch.library.opcheck(_ops.negative_lse_op, args)


@pytest.mark.parametrize("logit_map", MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_compile_fullgraph_matches_eager(backend, symmetric, logit_map):
    """Dynamo captures the op with no graph break (fullgraph=True raises on one), the fake
    implementation gives the right shapes, and forward and backward match eager. aot_eager runs
    the captured joint graph without code generation, which keeps this fast."""
    torch._dynamo.reset()
    tensors = make_problem(9, 11, 5, symmetric, True, logit_map, seed=5)
    kw = map_kwargs(logit_map)

    def f(anchors, candidates, inv_temp, pos_index, self_index, **_):
        out = _ops.negative_lse(backend, anchors, candidates, inv_temp, pos_index, self_index,
                                **kw)
        return out * 1.0  # an op around it, in the same graph

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    device = backend_device(backend)
    g = upstream(9)
    got, got_grads = run(compiled, tensors, logit_map, torch.float32, device, g=g)
    want, want_grads = run(f, tensors, logit_map, torch.float32, device, g=g)
    assert_rel_close(got, want, 1e-6, "lse_neg")
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert_rel_close(a, b, 1e-6, "grad")


# --------------------------------------------------------------------------------------------
# Both directions (layout cross_sym on one process): the rows and the columns of one S
# --------------------------------------------------------------------------------------------


def make_both_directions_problem(m, k, d, logit_map, seed, with_self=False):
    """``(anchors [m, d], candidates [k, d], inv_temp [m + k] or None, pos_index [m + k],
    self_index [m + k] or None)``: the rows' entries index the candidates, the columns' the
    anchors (as CLIP's image->text then text->image)."""
    g = torch.Generator().manual_seed(seed)
    norm = 0.9 if logit_map is ARTANH else 1.0
    anchors, candidates = (norm * torch.nn.functional.normalize(
        torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) for n in (m, k))
    pos_index = torch.cat([torch.randint(0, k, (m,), generator=g),
                           torch.randint(0, m, (k,), generator=g)])
    self_index = None
    if with_self:  # differs from the positive where the other side has room
        self_index = torch.cat([(pos_index[:m] + 1) % k, (pos_index[m:] + 1) % m])
    inv_temp = (1 / (0.05 + torch.rand(m + k, generator=g, dtype=torch.float64))
                if logit_map is SCALED else None)
    return anchors, candidates, inv_temp, pos_index, self_index


def dense_both_directions(anchors, candidates, inv_temp, pos_index, self_index, **kw):
    """The oracle: the rows' and the columns' dense problems, one after the other."""
    m = anchors.shape[0]

    def part(t, rows):
        return None if t is None else t[rows]

    rows, cols = slice(0, m), slice(m, None)
    return torch.cat([
        dense_negative_lse(anchors, candidates, part(inv_temp, rows), pos_index[rows],
                           part(self_index, rows), **kw),
        dense_negative_lse(candidates, anchors, part(inv_temp, cols), pos_index[cols],
                           part(self_index, cols), **kw)])


def both_op(backend):
    def call(anchors, candidates, inv_temp, pos_index, self_index, **kw):
        return _ops.negative_lse(backend, anchors, candidates, inv_temp, pos_index, self_index,
                                 both_directions=True, **kw)
    return call


# (M, K, D): one tile with ragged edges, rectangular both ways, several tiles ("L": 300 rows,
# 70 under Triton's interpreter).
BOTH_SHAPES = [(2, 3, 5), (33, 33, 40), (33, 7, 1), ("L", 33, 5), (33, "L", 9)]


@pytest.mark.parametrize("dtype_name,dtype", DTYPES, ids=[n for n, _ in DTYPES])
@pytest.mark.parametrize("with_self", [False, True], ids=["noself", "self"])
@pytest.mark.parametrize("logit_map", MAPS, ids=MAP_IDS)
@pytest.mark.parametrize("m,k,d", [
    pytest.param(m, k, d, id=f"{m}x{k}x{d}", marks=[pytest.mark.slow] if "L" in (m, k) else [])
    for m, k, d in BOTH_SHAPES])
def test_both_directions_matches_dense_oracle(backend, m, k, d, logit_map, with_self,
                                              dtype_name, dtype):
    """``both_directions``: lse_neg of the rows then of the columns, and the gradients wrt both
    row sets and the M + K inverse temperatures, against the two dense problems."""
    m, k = (large(backend) if v == "L" else v for v in (m, k))
    if with_self and min(m, k) < 3:
        pytest.skip("too few rows for a self that differs from the positive")
    tensors = make_both_directions_problem(m, k, d, logit_map, seed=m * 100 + k + d,
                                           with_self=with_self)
    oracle_dtype = dtype if (logit_map is ARTANH and d == 1) else torch.float64
    rounded = [t if (t is None or not t.is_floating_point()) else t.to(dtype).double()
               for t in tensors]
    got, got_grads = run(both_op(backend), tensors, logit_map, dtype, backend_device(backend))
    want, want_grads = run(dense_both_directions, rounded, logit_map, oracle_dtype,
                           torch.device("cpu"))
    tol = TOLERANCES[dtype_name]
    assert got.dtype == dtype and got.shape == (m + k,)
    assert_rel_close(got, want, tol, "lse_neg")
    for name, a, b in zip(("d_anchors", "d_candidates", "d_inv_temp"), got_grads, want_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel_close(a, b, tol, name)


@pytest.mark.parametrize("grad", [(True, False, False), (False, True, False),
                                  (False, False, True), (True, True, True)],
                         ids=["A", "C", "T", "ACT"])
def test_both_directions_equals_two_calls(backend, grad):
    """One call in both directions against the two plain calls it replaces, with only some
    inputs requiring a gradient (float64: the same sums in another order)."""
    m, k = 37, large(backend) if backend != "torch" else 300
    anchors, candidates, inv_temp, pos_index, _ = make_both_directions_problem(
        m, k, 6, SCALED, seed=11)
    device = backend_device(backend)
    g = upstream(m + k)
    both, both_grads = run(both_op(backend), (anchors, candidates, inv_temp, pos_index, None),
                           SCALED, torch.float64, device, grad=grad, g=g)

    def two_calls(a, c, t, pos, slf, **kw):
        return torch.cat([
            _ops.negative_lse(backend, a, c, None if t is None else t[:m], pos[:m], None, **kw),
            _ops.negative_lse(backend, c, a, None if t is None else t[m:], pos[m:], None, **kw)])

    two, two_grads = run(two_calls, (anchors, candidates, inv_temp, pos_index, None), SCALED,
                         torch.float64, device, grad=grad, g=g)
    assert_rel_close(both, two, 1e-12, "lse_neg")
    for name, a, b in zip(("d_anchors", "d_candidates", "d_inv_temp"), both_grads, two_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel_close(a, b, 1e-12, name)


def test_both_directions_argument_checks(backend):
    anchors, candidates, inv_temp, pos_index, _ = make_both_directions_problem(
        4, 5, 3, SCALED, seed=0)
    device = backend_device(backend)
    anchors, candidates, inv_temp, pos_index = (
        t.to(device) for t in (anchors, candidates, inv_temp, pos_index))
    with pytest.raises(ValueError, match="candidates"):
        _ops.negative_lse(backend, anchors, None, inv_temp, pos_index, None,
                          both_directions=True)
    with pytest.raises(ValueError, match="inv_temp"):
        _ops.negative_lse(backend, anchors, candidates, inv_temp[:4], pos_index, None,
                          both_directions=True)
    with pytest.raises(ValueError, match="pos_index"):
        _ops.negative_lse(backend, anchors, candidates, inv_temp, pos_index[:4], None,
                          both_directions=True)
