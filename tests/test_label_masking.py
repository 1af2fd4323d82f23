"""False-negative masking (docs/math.md#label-masked-negatives): ``labels=`` of ``infonce_loss``,
``dcl_loss`` and ``macl_loss`` on every backend against the reference (which masks the full
matrix), in every layout, float64 and float32, loss and gradients; an anchor whose every
candidate shares its label gets loss 0 and no gradient; the values of the masked forms on the
SupCon case C1's inputs (docs/math.md: MACL's ``A``, ``tau`` and loss); bad labels."""

from __future__ import annotations

import pytest
import torch

import macl_kernels as mk
from conftest import KERNEL_BACKENDS, TOLERANCES, assert_same_results, backend_device, \
    heavy_on_interpreter, loss_and_grads, make_pair

LOSSES = {
    "infonce": (mk.infonce_loss, dict(temperature=0.2)),
    "dcl": (mk.dcl_loss, dict(temperature=0.2)),
    "dclw": (mk.dcl_loss, dict(temperature=0.2, weighted=True)),
    "macl": (mk.macl_loss, dict(temperature=0.2, alpha=0.5, a0=0.1)),
}
BACKENDS = heavy_on_interpreter(tuple(KERNEL_BACKENDS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layout", ["2n", "cross", "cross_sym"])
@pytest.mark.parametrize("dtype_name,dtype,n", [("float64", torch.float64, 9),
                                                ("float32", torch.float32, 40)])
def test_labels_match_reference(backend, loss, layout, dtype_name, dtype, n):
    fn, kw = LOSSES[loss]
    z1, z2 = make_pair(n, 5, seed=n, dtype=dtype)
    labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n))
    labels[0] = 99  # a class of one: only its instance positive shares its label
    device = backend_device(backend)
    got = loss_and_grads(fn, z1.to(device), z2.to(device), layout=layout, backend=backend,
                         labels=labels.to(device), **kw)
    want = loss_and_grads(fn, z1.double(), z2.double(), layout=layout, backend="reference",
                          labels=labels, **kw)
    assert_same_results([t.cpu().double() for t in got], want, TOLERANCES[dtype_name])


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_one_class_rows_are_zero(backend, loss):
    """Every candidate shares the anchor's label: loss 0, gradient 0 (not -inf, 1 or NaN)."""
    fn, kw = LOSSES[loss]
    z1, z2 = make_pair(5, 4, seed=3)
    device = backend_device(backend)
    leaves = [z.to(device).requires_grad_(True) for z in (z1, z2)]
    out = fn(*leaves, labels=torch.full((5,), 7, device=device), backend=backend,
             reduction="none", **kw)
    assert torch.equal(out.detach().cpu(), torch.zeros_like(out.detach().cpu()))
    grads = torch.autograd.grad(out.sum(), leaves)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_labels_values_on_supcon_c1_inputs():
    """MACL with the instance positive and label-masked denominators on SupCon case C1's inputs
    (docs/math.md#label-masked-negatives): ``tau(A)`` from the augmentation pairs, and InfoNCE
    at that ``tau`` (reweight=False)."""
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(6, 2, 4, generator=g, dtype=torch.float64),
                                      dim=-1)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    for backend in ("reference", "cpu"):
        got = mk.macl_loss(f[:, 0], f[:, 1], temperature=0.1, alpha=0.5, a0=0.0, labels=y,
                           backend=backend).item()
        assert abs(got - 6.29168956297441) <= 1e-12 * 6.3
        got = mk.macl_loss(f[:, 0], f[:, 1], temperature=0.1, alpha=0.5, a0=0.0, labels=y,
                           reweight=False, backend=backend).item()
        assert abs(got - 6.03663034932671) <= 1e-12 * 6.1


def test_bad_labels():
    z1, z2 = make_pair(4, 3)
    with pytest.raises(ValueError, match="labels"):
        mk.infonce_loss(z1, z2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels"):
        mk.dcl_loss(z1, z2, labels=torch.zeros(4))
    with pytest.raises(TypeError, match="labels"):
        mk.macl_loss(z1, z2, labels=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="labels cannot be combined with negatives"):
        mk.infonce_loss(z1, z2, labels=torch.arange(4), negatives=z1)
