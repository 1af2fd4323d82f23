"""The fused C++/OpenMP backend (``backend="cpu"``, csrc/cpu/): what is specific to
it. Its primitive (shapes straddling its 256 x 256 tiles, both logit maps, float32 and float64) is
tested with every other backend's in test_primitive.py and its losses in test_losses.py.

``make test`` builds the extension first, so nothing here is skipped when it is missing: a
missing extension is a failure (``test_extension_is_built`` says why).
"""

from __future__ import annotations

import pytest
import torch

import macl_kernels as mk
from conftest import assert_rel_close, assert_same_results, loss_and_grads, make_pair
from macl_kernels.primitive import ops as _ops
from macl_kernels.primitive.protocol import LogitMap, missing_build
from macl_kernels.primitive.backends import _native
from macl_kernels.primitive.backends import cpu as CPU

TILE = 256  # the kernel's BLOCK


def _spread_first_tile(logit_map, g, rows, partners=None):
    """Make the first tile's logits far from the rest (for the one-exponential range check):
    scaled map, rows (and partners) 0..TILE scaled to norm 30; artanh map (S stays in [-1, 1]),
    partner r + 1 of row r (r even) made a near-duplicate of it: a negative with logit ~ 200.
    Returns the logit map's keyword arguments."""
    if logit_map is LogitMap.ARTANH:
        target = rows if partners is None else partners
        target[1:TILE:2] = torch.nn.functional.normalize(rows[0:TILE:2] + 1e-4 * torch.randn(
            TILE // 2, rows.shape[1], generator=g, dtype=rows.dtype), dim=1)
        return dict(logit_map=logit_map, artanh_scale=40.0, artanh_eps=1e-6)
    for t in (rows, partners):
        if t is not None:
            t[:TILE] *= 30.0
    return dict(logit_map=logit_map, artanh_scale=0.0, artanh_eps=0.0)


def _one_tensor_problem(z, inv_temp, pos_index, self_index, up, symmetric, **kw):
    """lse_neg of the rows of ``z`` against themselves and the gradients (of ``z``, then of
    ``inv_temp`` when given): symmetric (``candidates=None``: the kernel's symmetric tiling), or
    as a cross problem against a copy (no symmetry, row passes only) whose two gradients are
    folded into the one tensor's, as the symmetric call returns it."""
    x = z.clone().requires_grad_(True)
    y = None if symmetric else z.clone().requires_grad_(True)
    b = None if inv_temp is None else inv_temp.clone().requires_grad_(True)
    out = _ops.negative_lse("cpu", x, y, b, pos_index, self_index, **kw)
    grads = torch.autograd.grad(out, [t for t in (x, y, b) if t is not None], up)
    if not symmetric:
        grads = (grads[0] + grads[1],) + grads[2:]
    return out, grads


def test_extension_is_built():
    reasons = CPU.BACKEND.not_supported_reasons(torch.device("cpu"))
    assert not reasons, reasons
    assert CPU.BACKEND.extension.state().status == _native.BUILT
    assert mk.available_backends("cpu")["cpu"] is None
    assert mk.available_backends()["cpu"] is None


def test_auto_prefers_cpu_backend_on_cpu_tensors():
    from macl_kernels.primitive.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_extension_built_against_this_torch():
    assert CPU._EXTENSION.get().built_with_torch == torch.__version__


def test_missing_extension_says_why_and_how_to_build(monkeypatch):
    """An extension that does not import: the reason names it, the import error and the build
    command; ``auto`` passes over it to "torch" with a warning, once."""
    from macl_kernels.primitive import backends

    missing = _native.Extension("macl_kernels._C_cpu_not_there")
    monkeypatch.setattr(CPU, "_EXTENSION", missing)
    reason = "; ".join(CPU.BACKEND.not_supported_reasons(torch.device("cpu")))
    assert "macl_kernels._C_cpu_not_there" in reason
    assert "could not be imported" in reason and "ModuleNotFoundError" in reason
    assert "pip install --no-build-isolation -e ." in reason
    assert CPU.BACKEND.extension.state().status != _native.BUILT
    monkeypatch.setattr(backends, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="passed over the native backend 'cpu'"):
        assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.skipif(bool(torch.version.cuda) and torch.cuda.is_available(),
                    reason="needs a machine where the cuda backend cannot run anyway")
def test_auto_is_silent_about_native_backends_that_could_not_run_anyway(monkeypatch):
    """The warning is about a missing build, not about a missing GPU: ``auto`` on a CUDA device
    with a CPU build of torch passes over ``cuda`` (never built here) without a warning."""
    import warnings

    from macl_kernels.primitive import backends

    monkeypatch.setattr(backends, "_WARNED", set())
    assert not missing_build(backends.not_supported_reasons("cuda", torch.device("cuda")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.resolve_backend("auto", torch.device("cuda"), 4096)
        backends.resolve_backend("auto", torch.device("cpu"))


@pytest.mark.parametrize("logit_map", list(LogitMap), ids=["scaled", "artanh"])
def test_symmetric_tiling_equals_full_tiling_across_tiles(logit_map):
    """Layout 2n (``candidates=None``) computes only the tiles on and above the diagonal, each
    for its rows and its columns; a copy of the rows as candidates takes the full tiling. Three
    tiles a side (2 * 256 + 88 rows): the same numbers."""
    m = 2 * TILE + 88
    g = torch.Generator().manual_seed(m)
    U = torch.nn.functional.normalize(torch.randn(m, 17, generator=g, dtype=torch.float64), dim=1)
    artanh = logit_map is LogitMap.ARTANH
    inv_temp = None if artanh else 1 / (0.05 + torch.rand(m, generator=g, dtype=torch.float64))
    pos_index, self_index = (torch.arange(m) + m // 2) % m, torch.arange(m)
    kw = dict(logit_map=logit_map, artanh_scale=2.0 if artanh else 0.0,
              artanh_eps=1e-6 if artanh else 0.0)
    up = torch.randn(m, generator=g, dtype=torch.float64)

    sym, sym_grads = _one_tensor_problem(U, inv_temp, pos_index, self_index, up, True, **kw)
    full, full_grads = _one_tensor_problem(U, inv_temp, pos_index, self_index, up, False, **kw)
    assert_rel_close(sym, full, 1e-13, "lse_neg")
    assert_rel_close(sym_grads[0], full_grads[0], 1e-13, "d U")
    if not artanh:
        assert_rel_close(sym_grads[1], full_grads[1], 1e-13, "d inv_temp")


@pytest.mark.parametrize("loss", ["macl_2n", "clip"])
def test_results_are_bitwise_reproducible(loss):
    """Per-thread accumulators summed in a fixed order, no atomics: identical runs, identical
    bits (for a given thread count), across several tiles; CLIP's columns' statistics (both
    directions from one tile) included."""
    runs = []
    for _ in range(2):
        z1, z2 = make_pair(2 * TILE + 5, 24, seed=3, dtype=torch.float32)
        if loss == "clip":
            runs.append(loss_and_grads(lambda a, b, **kw: mk.clip_loss(a, b, 14.0, **kw), z1, z2,
                                       backend="cpu"))
        else:
            runs.append(loss_and_grads(mk.macl_loss, z1, z2, backend="cpu"))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_thread_count_does_not_change_results():
    z1, z2 = make_pair(TILE + 40, 16, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(mk.infonce_loss, z1, z2, backend="cpu")
        torch.set_num_threads(max(2, before))
        many = loss_and_grads(mk.infonce_loss, z1, z2, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert_same_results(many, one, 1e-13)


def test_rejects_non_cpu_tensors_clearly():
    assert "CPU tensors only" in "; ".join(CPU.BACKEND.not_supported_reasons(
        torch.device("meta")))
    with pytest.raises(RuntimeError, match="cpu"):
        mk.macl_loss(torch.randn(4, 3, device="meta"), torch.randn(4, 3, device="meta"),
                     backend="cpu", validate=False)


@pytest.mark.parametrize("logit_map", list(LogitMap), ids=["scaled", "artanh"])
def test_one_exponential_both_directions_path_and_its_fallback(logit_map):
    """CLIP's both-directions problem (one shared inv_temp, diagonal positives) takes one
    exponential per pair for the row and the column side when a tile's statistics lie within
    SHARED_EXP_SPAN (60) of each other, and the two-exponential passes otherwise
    (docs/math.md#one-exponential-for-both-directions). The first tile's rows have large logits
    (scaled: norm 30; artanh: a near-duplicate negative), the rest small ones: tiles where the lse_neg span exceeds 60 and tiles where it does not, checked
    on the result itself, and both against two one-direction calls (row passes only) in float64,
    values and gradients of anchors, candidates and inv_temp."""
    m = 2 * TILE + 40
    g = torch.Generator().manual_seed(11)
    a = torch.nn.functional.normalize(torch.randn(m, 16, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(a + 0.7 * torch.randn(m, 16, generator=g,
                                                            dtype=torch.float64), dim=1)
    artanh = logit_map is LogitMap.ARTANH
    kw = _spread_first_tile(logit_map, g, a, c)
    inv_temp = None if artanh else torch.full((2 * m,), 2.5, dtype=torch.float64)
    pos_index = torch.cat([torch.arange(m), torch.arange(m)])
    up = torch.rand(2 * m, generator=g, dtype=torch.float64)

    def run(both):
        x, y = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
        b = None if inv_temp is None else inv_temp.clone().requires_grad_(True)
        if both:
            out = _ops.negative_lse("cpu", x, y, b, pos_index, None, both_directions=True, **kw)
        else:  # one direction per call: the row passes only, no shared exponential
            rows = _ops.negative_lse("cpu", x, y, None if b is None else b[:m], pos_index[:m],
                                     None, **kw)
            cols = _ops.negative_lse("cpu", y, x, None if b is None else b[m:], pos_index[m:],
                                     None, **kw)
            out = torch.cat([rows, cols])
        leaves = [t for t in (x, y, b) if t is not None]
        return out, torch.autograd.grad(out, leaves, up)

    got, got_grads = run(True)
    want, want_grads = run(False)
    spans = []
    for i in range(0, m, TILE):
        for j in range(0, m, TILE):
            block = torch.cat([got[i:i + TILE], got[m + j:m + j + TILE]])
            spans.append(float(block.max() - block.min()))
    assert max(spans) > 60 and min(spans) <= 60, spans  # both paths taken
    assert_rel_close(got, want, 1e-12, "lse_neg")
    for name, x, y in zip(["d anchors", "d candidates", "d inv_temp"], got_grads, want_grads):
        assert_rel_close(x, y, 1e-11, name)


@pytest.mark.parametrize("logit_map", list(LogitMap), ids=["scaled", "artanh"])
def test_one_exponential_symmetric_path_and_its_fallback(logit_map):
    """Layout 2n on one process with one temperature (a symmetric problem whose excluded pairs,
    self and positive, are symmetric) takes one exponential per pair for the two anchors that an
    off-diagonal tile serves, when the tile's statistics lie within SHARED_EXP_SPAN (60) of each
    other, and the two-exponential passes otherwise. The first block's rows are made far from the
    rest (scaled: norm 30; artanh: near-duplicate negatives), so that some off-diagonal tiles
    exceed the span and others do not; both are checked against the same rows as a cross problem
    (candidates a copy: no symmetry, row passes only) in float64: lse_neg, the gradient of the one
    tensor (d anchors + d candidates of the copy) and d inv_temp."""
    n = TILE + 20
    m = 2 * n  # three 256-blocks: off-diagonal tiles (0, 1), (0, 2), (1, 2)
    g = torch.Generator().manual_seed(12)
    z1 = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
    z2 = torch.nn.functional.normalize(z1 + 0.7 * torch.randn(n, 16, generator=g,
                                                              dtype=torch.float64), dim=1)
    z = torch.cat([z1, z2])
    artanh = logit_map is LogitMap.ARTANH
    kw = _spread_first_tile(logit_map, g, z)
    inv_temp = None if artanh else torch.full((m,), 2.5, dtype=torch.float64)
    pos_index = (torch.arange(m) + n) % m
    self_index = torch.arange(m)
    up = torch.rand(m, generator=g, dtype=torch.float64)

    got, got_grads = _one_tensor_problem(z, inv_temp, pos_index, self_index, up, True, **kw)
    got = got.detach()
    want, want_grads = _one_tensor_problem(z, inv_temp, pos_index, self_index, up, False, **kw)
    spans = []
    for i in range(0, m, TILE):
        for j in range(i + TILE, m, TILE):
            block = torch.cat([got[i:i + TILE], got[j:j + TILE]])
            spans.append(float(block.max() - block.min()))
    assert max(spans) > 60 and min(spans) <= 60, spans  # both paths taken
    assert_rel_close(got, want, 1e-12, "lse_neg")
    for name, x, y in zip(["d z", "d inv_temp"], got_grads, want_grads):
        assert_rel_close(x, y, 1e-11, name)


def _shift_stress(g, m, d, dtype):
    """``(anchors, others)`` [m, d], normalised, that stress the forward's known shift at inverse
    temperature 100: the others' first tile lies near ``-e1`` and the rest near ``e1``; anchors
    ``[0, 64)`` lie near ``e1`` ("rising": logits ~ -100 in the first tile, ~ +100 after it, so
    the running max after the first tile is ~ 200 below the next tiles' logits: overflow), anchors
    ``[64, 128)`` near ``e2``, orthogonal to ``e1`` ("flat": every logit ~ 0, ~ 100 below the
    Cauchy-Schwarz bound: the first tile underflows in float32), the rest random (in range)."""
    e = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0].T.to(dtype)
    noise = lambda n, size=0.02: size * torch.randn(n, d, generator=g, dtype=dtype)  # noqa: E731
    others = torch.cat([-e[0] + noise(TILE, 0.005), e[0] + noise(m - TILE, 0.005)])
    anchors = torch.cat([e[0] + noise(64), e[1] + noise(64, 0.002),
                         torch.randn(m - 128, d, generator=g, dtype=dtype)])
    return (torch.nn.functional.normalize(anchors, dim=1),
            torch.nn.functional.normalize(others, dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("problem", ["cross", "cross_eqs", "both_shared", "both_per_entry"])
def test_forward_known_shift_falls_back_out_of_range(problem, dtype):
    """The forward shifts each tile's sums by a shift it already knows - the anchor's running max
    over its earlier tiles, capped by the Cauchy-Schwarz bound of the tile's logits - instead of
    their max (docs/math.md#the-forwards-known-shift), and redoes a row or column whose sum falls
    outside [e^-60, e^60] with its exact max. Anchors whose logits jump ~200 above the running
    max (without the upper check float32 overflows: inf) and anchors ~100 below the bound
    everywhere (without the lower check float32 flushes to 0: -inf) sit next to anchors that keep
    the shift. Rows (cross, with and without eqs), columns (both directions, per-entry
    temperatures: the column passes) and the shared one-exponential tile (one temperature), each
    against float64 logsumexp."""
    g = torch.Generator().manual_seed(11)
    m, d = 2 * TILE + 40, 16
    both = problem.startswith("both")
    anchors, others = _shift_stress(g, m, d, dtype)
    # cross: the stressed anchors are the rows; both directions: the columns
    u, v = (others, anchors) if both else (anchors, others)
    entries = 2 * m if both else m
    inv_temp = torch.full((entries,), 100.0, dtype=dtype)
    if problem == "both_per_entry":
        inv_temp -= torch.rand(entries, generator=g, dtype=dtype)
    pos_index = torch.arange(m).repeat(2 if both else 1)
    kw = dict(both_directions=True) if both else {}
    if problem == "cross_eqs":
        kw = dict(return_eqs=True)
    got = _ops.negative_lse("cpu", u, v, inv_temp, pos_index, None, **kw)

    def logits_of(s, scale):  # float64, positive (the diagonal) excluded
        return (scale[:, None] * s).masked_fill(torch.eye(m, dtype=torch.bool), -torch.inf)

    def oracle(s, scale):  # float64 lse_neg and eqs of the rows of s
        logits = logits_of(s, scale)
        lse = torch.logsumexp(logits, 1)
        return lse, ((logits - lse[:, None]).exp() * s).sum(1)

    s64 = u.double() @ v.double().T
    want, want_eqs = oracle(s64, inv_temp.double()[:m])
    if both:
        want = torch.cat([want, oracle(s64.T, inv_temp.double()[m:])[0]])
    if problem == "cross_eqs":
        got, got_eqs = got
        assert_rel_close(got_eqs, want_eqs.to(dtype), 1e-5 if dtype == torch.float32 else 1e-12,
                         "eqs")
    # The construction: the stressed anchors' logits (as rows of `stressed`) rise by > 150 after
    # their first tile ("rising") or stay > 95 below the bound, inv_temp ("flat": every float32
    # term of a tile flushes to 0 there, 256 e^-95 < e^-87.3).
    stressed = (logits_of(s64.T, inv_temp.double()[m:]) if both
                else logits_of(s64, inv_temp.double()[:m]))
    bound = inv_temp.double()[m:] if both else inv_temp.double()[:m]  # |u| = |v| = 1
    rise = stressed[:, TILE:].max(1).values - stressed[:, :TILE].max(1).values
    assert (rise[:64] > 150).all() and (bound - stressed.max(1).values)[64:128].min() > 95
    assert (rise[128:].abs() < 40).any()  # anchors whose later tiles keep the known shift
    assert torch.isfinite(got).all()
    assert_rel_close(got, want.to(dtype), 1e-5 if dtype == torch.float32 else 1e-12, "lse_neg")
