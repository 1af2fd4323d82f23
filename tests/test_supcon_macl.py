"""Supervised MACL (our extension, docs/math.md#supervised-macl) against a dense autograd oracle
of its definition (every same-label pair a positive with its own label-masked denominator,
``sg(V) (-log P)`` per pair), on every backend: loss and gradients, float64 and float32; the
value on SupCon case C1's inputs; rows without a positive or without a label-negative; bad
inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import KERNEL_BACKENDS, TOLERANCES, assert_rel_close, backend_device, \
    heavy_on_interpreter
from macl_kernels._math import macl_temperature
from macl_kernels.supervised import supcon_macl_loss

BACKENDS = heavy_on_interpreter(("reference",) + tuple(KERNEL_BACKENDS))


def oracle(features, labels, temperature, alpha, a0, alignment="label"):
    bsz, views = features.shape[:2]
    U = torch.cat(torch.unbind(F.normalize(features, dim=2), dim=1))
    y = labels.repeat(views)
    m = U.shape[0]
    S = U @ U.T
    same = y[:, None] == y[None, :]
    positive = same & ~torch.eye(m, dtype=torch.bool)
    npos = positive.sum(1)
    has_pos = npos > 0
    if alignment == "label":
        per = (S * positive).sum(1) / npos.clamp_min(1)
        A = per[has_pos].mean().detach()
    else:
        u = F.normalize(features, dim=2)
        A = (u[:, 0] * u[:, 1]).sum(1).mean().detach()
    tau = macl_temperature(A, temperature, alpha, a0, "linear")
    logits = S / tau
    has_neg = (~same).any(1)
    lse = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1)
    lse = torch.where(has_neg, lse, torch.zeros_like(lse))
    x = lse[:, None] - logits
    x = torch.where(positive, x, torch.zeros_like(x))
    value = (1 + torch.exp(-x)) * F.softplus(x, threshold=1000)
    term = value.detach() + x - x.detach()  # sg(V) softplus(x) has gradient 1 in x
    per_anchor = (term * positive).sum(1) / npos.clamp_min(1)
    return torch.where(has_pos & has_neg, per_anchor, torch.zeros_like(per_anchor)).mean()


CASES = [(6, 2, 4, "C1"), (9, 3, 5, 3), (40, 2, 8, 5), (7, 1, 3, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype_name,dtype", [("float64", torch.float64),
                                              ("float32", torch.float32)])
def test_matches_dense_oracle(backend, case, dtype_name, dtype):
    bsz, views, d, classes = CASES[case]
    g = torch.Generator().manual_seed(case)
    feats = torch.randn(bsz, views, d, generator=g, dtype=torch.float64)
    labels = (torch.tensor([0, 1, 0, 2, 1, 0]) if classes == "C1"
              else torch.randint(0, classes, (bsz,), generator=g))
    alignment = "instance" if (case == 1) else "label"
    device = backend_device(backend)
    mine = feats.to(dtype).to(device).requires_grad_(True)
    loss = supcon_macl_loss(mine, labels.to(device), temperature=0.1, alpha=0.5, a0=0.1,
                            alignment=alignment, backend=backend)
    (grad,) = torch.autograd.grad(loss, mine)
    ref = feats.to(dtype).double().requires_grad_(True)
    want = oracle(ref, labels, 0.1, 0.5, 0.1, alignment)
    (want_grad,) = torch.autograd.grad(want, ref)
    tol = TOLERANCES[dtype_name]
    assert loss.dtype == dtype
    assert_rel_close(loss.detach().cpu().double(), want.detach(), tol, "loss")
    assert_rel_close(grad.cpu().double(), want_grad, tol, "grad")


def test_value_on_supcon_c1_inputs():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(6, 2, 4, generator=g, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    for backend in ("reference", "cpu"):
        got = supcon_macl_loss(f, y, temperature=0.1, alpha=0.5, a0=0.0, backend=backend).item()
        assert abs(got - 6.59779144473568) <= 1e-12 * 6.6


def test_edge_rows_and_bad_inputs():
    f = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    one_class = supcon_macl_loss(f, torch.zeros(4, dtype=torch.int64), backend="cpu")
    assert one_class.item() == 0.0
    (grad,) = torch.autograd.grad(one_class, f)
    assert torch.equal(grad, torch.zeros_like(grad))
    with pytest.raises(ValueError, match="labels"):
        supcon_macl_loss(f, None)
    with pytest.raises(ValueError, match="alignment"):
        supcon_macl_loss(f, torch.arange(4), alignment="pairs")
    with pytest.raises(ValueError, match="instance"):
        supcon_macl_loss(f[:, :1], torch.arange(4), alignment="instance")
