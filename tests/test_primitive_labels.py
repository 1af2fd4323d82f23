"""The primitive's label mask and its per-row statistic ``eqs``, on every kernel backend
usable here, against the dense autograd oracle ``conftest.dense_negative_lse``
(docs/math.md#label-masked-negatives, #per-row-statistic-eqs):

    Neg(a) = every k but pos_index[a], self_index[a] and every k with
             candidate_labels[k] == anchor_labels[a]
    eqs[a] = sum_{k in Neg(a)} Q_ak S_ak = d lse_neg[a] / d inv_temp[a]

``eqs`` is checked against the oracle's ``d inv_temp`` under a unit upstream gradient (the
identity above), with and without labels, symmetric and cross, with ``pos_index = -1`` (no
positive among the candidates) too. Shapes straddle the kernels' tiles (cpu 256, Triton's
interpreter 32)."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, KERNEL_BACKENDS, TOLERANCES, assert_rel_close, backend_device, \
    dense_negative_lse
from macl_kernels.primitive import ops as _ops


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    return request.param


def large(backend):
    return 70 if (backend == "triton" and not HAS_CUDA) else 300


def problem(m, k, d, symmetric, classes, seed, no_positive=False):
    g = torch.Generator().manual_seed(seed)

    def rows(n):
        return torch.nn.functional.normalize(torch.randn(n, d, generator=g,
                                                         dtype=torch.float64), dim=1)

    anchors = rows(m)
    anchor_labels = torch.randint(0, classes, (m,), generator=g)
    if symmetric:
        candidates, candidate_labels = None, None
        pos_index = (torch.arange(m) + max(1, m // 2)) % m
        self_index = torch.arange(m)
    else:
        candidates = rows(k)
        candidate_labels = torch.randint(0, classes, (k,), generator=g)
        pos_index = torch.randint(0, k, (m,), generator=g)
        self_index = None
    if no_positive:
        pos_index = torch.full((m,), -1, dtype=torch.int64)
    inv_temp = 1 / (0.05 + torch.rand(m, generator=g, dtype=torch.float64))
    return anchors, candidates, inv_temp, pos_index, self_index, anchor_labels, candidate_labels


def run(fn, tensors, dtype, device, g, labels=True):
    anchors, candidates, inv_temp, pos_index, self_index, yA, yC = tensors
    leaves = [None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True)
              for t in (anchors, candidates, inv_temp)]
    kw = {}
    if labels:
        kw = dict(anchor_labels=yA.to(device),
                  candidate_labels=None if yC is None else yC.to(device))
    out = fn(leaves[0], leaves[1], leaves[2], pos_index.to(device),
             None if self_index is None else self_index.to(device), **kw)
    needing = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, needing, g.to(device=device, dtype=out.dtype))
    return out.detach().cpu(), [t.cpu() for t in grads]


def op(backend):
    def call(anchors, candidates, inv_temp, pos_index, self_index, **kw):
        return _ops.negative_lse(backend, anchors, candidates, inv_temp, pos_index, self_index,
                                 **kw)
    return call


SHAPES = [("sym", 2, None, 3, 2), ("sym", 33, None, 5, 3), ("sym", "L", None, 5, 7),
          ("cross", 2, 3, 4, 2), ("cross", 33, "L", 5, 4), ("cross", "L", 33, 8, 50)]


@pytest.mark.parametrize("dtype_name,dtype", [("float64", torch.float64),
                                              ("float32", torch.float32)])
@pytest.mark.parametrize("kind,m,k,d,classes", SHAPES,
                         ids=[f"{s[0]}-{s[1]}x{s[2]}-c{s[4]}" for s in SHAPES])
def test_label_mask_matches_oracle(backend, kind, m, k, d, classes, dtype_name, dtype):
    m = large(backend) if m == "L" else m
    k = large(backend) if k == "L" else k
    tensors = problem(m, k, d, kind == "sym", classes, seed=m + 7 * classes)
    rounded = [t if (t is None or not t.is_floating_point()) else t.to(dtype).double()
               for t in tensors]
    g = torch.randn(m, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got, got_grads = run(op(backend), tensors, dtype, backend_device(backend), g)
    want, want_grads = run(dense_negative_lse, rounded, torch.float64, torch.device("cpu"), g)
    tol = TOLERANCES[dtype_name]
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)  # rows whose every candidate is masked: -inf
    assert (got[~finite] == float("-inf")).all()
    assert_rel_close(got[finite], want[finite], tol, "lse_neg")
    for name, a, b in zip(("d_anchors", "d_candidates", "d_inv_temp"), got_grads, want_grads):
        assert torch.isfinite(a).all(), name
        assert_rel_close(a, b, tol, name)


def test_empty_label_set_gives_minus_inf_and_zero_gradient(backend):
    """A one-class batch masks every candidate: ``lse_neg = -inf`` (never NaN), zero gradients."""
    device = backend_device(backend)
    x = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1).to(device)
    x.requires_grad_(True)
    inv_temp = torch.full((6,), 10.0, dtype=torch.float64, device=device)
    labels = torch.zeros(6, dtype=torch.int64, device=device)
    pos = (torch.arange(6, device=device) + 3) % 6
    out = _ops.negative_lse(backend, x, None, inv_temp, pos, torch.arange(6, device=device),
                            anchor_labels=labels)
    assert (out == float("-inf")).all()
    (grad,) = torch.autograd.grad(out.clamp_min(-1e30).sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))
    _, eqs = _ops.negative_lse(backend, x.detach(), None, inv_temp, pos,
                               torch.arange(6, device=device), anchor_labels=labels,
                               return_eqs=True)
    assert torch.equal(eqs, torch.zeros_like(eqs))


@pytest.mark.parametrize("dtype_name,dtype", [("float64", torch.float64),
                                              ("float32", torch.float32)])
@pytest.mark.parametrize("kind,labels,no_positive", [
    ("sym", False, False), ("sym", True, False), ("cross", False, True),
    ("cross", True, False)], ids=["sym", "sym-labels", "cross-nopos", "cross-labels"])
def test_eqs_is_d_lse_d_inv_temp(backend, kind, labels, no_positive, dtype_name, dtype):
    """``eqs`` against the oracle's ``d lse_neg[a] / d inv_temp[a]`` (unit upstream gradient); the
    returned ``lse_neg`` is the plain one and still differentiable."""
    m = large(backend) if kind == "sym" else 33
    k = None if kind == "sym" else large(backend)
    tensors = problem(m, k, 6, kind == "sym", 5, seed=11, no_positive=no_positive)
    rounded = [t if (t is None or not t.is_floating_point()) else t.to(dtype).double()
               for t in tensors]
    device = backend_device(backend)
    anchors, candidates, inv_temp, pos, slf, yA, yC = tensors
    kw = dict(anchor_labels=yA.to(device), candidate_labels=None if yC is None else
              yC.to(device)) if labels else {}
    lse, eqs = _ops.negative_lse(
        backend, anchors.to(device, dtype), None if candidates is None else
        candidates.to(device, dtype), inv_temp.to(device, dtype), pos.to(device),
        None if slf is None else slf.to(device), return_eqs=True, **kw)
    assert eqs.dtype == dtype and eqs.shape == (m,) and not eqs.requires_grad
    want, want_grads = run(dense_negative_lse, rounded, torch.float64, torch.device("cpu"),
                           torch.ones(m, dtype=torch.float64), labels=labels)
    tol = TOLERANCES[dtype_name]
    assert_rel_close(lse.cpu(), want, tol, "lse_neg")
    assert_rel_close(eqs.cpu(), want_grads[-1], tol, "eqs")


def test_argument_checks():
    x = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    b = torch.ones(4, dtype=torch.float64)
    pos = torch.tensor([1, 0, 3, 2])
    with pytest.raises(ValueError, match="candidate_labels"):
        _ops.negative_lse("torch", x, x.clone(), b, pos, None,
                          anchor_labels=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="candidate_labels"):
        _ops.negative_lse("torch", x, None, b, pos, None,
                          anchor_labels=torch.zeros(4, dtype=torch.int64),
                          candidate_labels=torch.zeros(4, dtype=torch.int64))
    from macl_kernels.primitive.protocol import LogitMap
    with pytest.raises(ValueError, match="return_eqs"):
        _ops.negative_lse("torch", x, None, None, pos, None, logit_map=LogitMap.ARTANH,
                          artanh_scale=2.0, artanh_eps=1e-6, return_eqs=True)


@pytest.mark.slow  # opcheck runs every check of torch.library (seconds per backend)
def test_opcheck_with_labels_and_eqs(backend):
    """torch.library.opcheck of the op with the label arguments and ``need_eqs`` (the third
    output's fake shape, its non-differentiability, the backward with labels)."""
    device = backend_device(backend)
    for symmetric in (True, False):
        A, C, b, pos, slf, yA, yC = problem(8, 9, 5, symmetric, 3, seed=2)
        A, C, b = (None if t is None else t.to(device).requires_grad_(True) for t in (A, C, b))
        args = (backend, A, C, b, pos.to(device), None if slf is None else slf.to(device), 0,
                0.0, 0.0, None, True, 0, None, yA.to(device),
                None if yC is None else yC.to(device), True)
        torch.library.opcheck(_ops.negative_lse_op, args)
