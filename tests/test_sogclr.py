"""``GCLoss_v1`` (SogCLR / iSogCLR, docs/math.md#sogclr-and-isogclr) against an oracle that
re-implements LibAUC's ``GCLoss_v1.forward`` semantics densely (its exp without a shift, its
``-1e9`` self mask, its moving average, first-visit ``gamma`` and temperature update), step by
step: loss, input gradients and the state (``u``, ``learnable_tau``, ``grad_tau``) after each of
five steps with repeated indices, on every backend; the peer's reference values; the state as
buffers (``state_dict``, ``strict=False``), frozen state, ``no_grad``, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from conftest import KERNEL_BACKENDS, TOLERANCES, assert_rel_close, backend_device, \
    heavy_on_interpreter

BACKENDS = heavy_on_interpreter(("reference",) + tuple(KERNEL_BACKENDS))


class LibaucOracle:
    """LibAUC's GCLoss_v1 semantics (local, no distribution), in the state's dtype."""

    def __init__(self, N, tau=0.1, gamma=0.9, eps=1e-8, enable_isogclr=False, tau_min=0.05,
                 tau_max=0.7, rho=0.3, eta=0.01, beta=0.9, dtype=torch.float64):
        self.u = torch.zeros(N, 1, dtype=dtype)
        self.tau, self.gamma_min, self.gamma, self.eps = tau, gamma, 1.0, eps
        self.iso = enable_isogclr
        self.tau_min, self.tau_max, self.rho, self.eta, self.beta = tau_min, tau_max, rho, eta, beta
        self.learnable_tau = torch.full((N, 1), tau, dtype=dtype)
        self.grad_tau = torch.zeros(N, 1, dtype=dtype)

    def __call__(self, h1, h2, index):
        h1, h2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
        B = h1.shape[0]
        pos = F.one_hot(torch.arange(B), 2 * B).to(h1.dtype)
        self_mask = torch.eye(B, dtype=h1.dtype)
        aa, bb = h1 @ h1.T - 1e9 * self_mask, h2 @ h2.T - 1e9 * self_mask
        l1, l2 = torch.cat([h1 @ h2.T, aa], 1), torch.cat([h2 @ h1.T, bb], 1)
        tau = self.learnable_tau[index].to(h1.dtype) if self.iso else self.tau
        e1, e2 = torch.exp(l1 / tau) * (1 - pos), torch.exp(l2 / tau) * (1 - pos)
        if self.gamma > self.gamma_min:
            gamma = 1.0 if self.u[index].sum() == 0 else self.gamma_min
        else:
            gamma = self.gamma
        old = self.u[index].to(h1.dtype)
        u1 = (1 - gamma) * old + gamma * e1.sum(1, keepdim=True) / (2 * (B - 1))
        u2 = (1 - gamma) * old + gamma * e2.sum(1, keepdim=True) / (2 * (B - 1))
        self.u[index] = ((u1.detach() + u2.detach()) / 2).to(self.u.dtype)
        w1 = (e1 / u1.clamp(min=self.eps)).detach()
        w2 = (e2 / u2.clamp(min=self.eps)).detach()

        def part(w, lg):
            return -(pos * (lg - (w * lg).sum(1, keepdim=True) / (2 * (B - 1)))).sum(1)

        loss = (part(w1, l1) + part(w2, l2)).mean()
        if self.iso:
            g1 = torch.log(u1) + self.rho - (w1 * (l1 / tau).detach()).sum(1, keepdim=True) / (
                2 * (B - 1))
            g2 = torch.log(u2) + self.rho - (w2 * (l2 / tau).detach()).sum(1, keepdim=True) / (
                2 * (B - 1))
            g = ((g1 + g2) / 2).to(self.grad_tau.dtype)
            self.grad_tau[index] = (1 - self.beta) * self.grad_tau[index] + self.beta * g
            self.learnable_tau[index] = (self.learnable_tau[index] - self.eta *
                                         self.grad_tau[index]).clamp(self.tau_min, self.tau_max)
        return loss


STEPS = [[3, 7, 1, 5, 11], [0, 2, 4, 6, 8], [3, 1, 8, 9, 10], [7, 5, 0, 2, 3], [11, 4, 9, 1, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(tau=0.1, gamma=0.9),
                                    dict(tau=0.2, gamma=0.8, enable_isogclr=True),
                                    dict(tau=0.1, gamma=0.9, enable_isogclr=True, eta=2.0)],
                         ids=["sogclr", "isogclr", "isogclr-clamped"])
@pytest.mark.parametrize("dtype_name,dtype", [("float64", torch.float64),
                                              ("float32", torch.float32)])
def test_steps_match_libauc_semantics(backend, kwargs, dtype_name, dtype):
    device = backend_device(backend)
    ours = mk.GCLoss_v1(N=12, backend=backend, state_dtype=dtype, device=device, **kwargs)
    oracle = LibaucOracle(12, dtype=torch.float64, **kwargs)
    if dtype == torch.float32 and kwargs.get("enable_isogclr"):
        oracle.learnable_tau.fill_(float(torch.tensor(kwargs["tau"], dtype=torch.float32)))
    g = torch.Generator().manual_seed(5)
    tol = TOLERANCES[dtype_name]
    for step, index in enumerate(STEPS):
        if step == 3:
            ours.adjust_gamma(1)
            oracle.gamma = oracle.gamma_min
        h = [torch.randn(5, 6, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
        idx = torch.tensor(index)
        mine = [t.to(device).requires_grad_(True) for t in h]
        loss = ours(*mine, idx.to(device))
        got = torch.autograd.grad(loss, mine)
        ref = [t.double().requires_grad_(True) for t in h]
        want_loss = oracle(*ref, idx)
        want = torch.autograd.grad(want_loss, ref)
        assert loss.dtype == dtype
        assert_rel_close(loss.detach().cpu().double(), want_loss.detach(), tol, f"loss {step}")
        for a, b in zip(got, want):
            assert_rel_close(a.cpu().double(), b, tol, f"grad {step}")
        assert_rel_close(ours.u.cpu().double(), oracle.u, tol, f"u {step}")
        if kwargs.get("enable_isogclr"):
            assert_rel_close(ours.learnable_tau.cpu().double(), oracle.learnable_tau, tol,
                             f"tau {step}")
            assert_rel_close(ours.grad_tau.cpu().double(), oracle.grad_tau, tol,
                             f"grad_tau {step}")


def test_libauc_reference_values():
    """Values of LibAUC's own GCLoss_v1 (state widened to float64; docs/math.md)."""
    indices = [[3, 7, 1, 5], [0, 2, 4, 6], [3, 1, 8, 9], [7, 5, 0, 2]]
    cases = [(dict(tau=0.1, gamma=0.9),
              [1.84304718671473, 1.59635649132023, 1.20501041496586, 1.25279689449595]),
             (dict(tau=0.1, gamma=0.9, enable_isogclr=True),
              [1.84304718532058, 1.59635649008794, 1.18575899774585, 1.18578074155826])]
    for kwargs, want in cases:
        loss_fn = mk.GCLoss_v1(N=10, state_dtype=torch.float64, backend="cpu", **kwargs)
        if kwargs.get("enable_isogclr"):  # LibAUC's tau starts at float32(0.1)
            loss_fn.learnable_tau.fill_(float(torch.tensor(0.1, dtype=torch.float32)))
        g = torch.Generator().manual_seed(0)
        for index, value in zip(indices, want):
            h1 = torch.randn(4, 4, generator=g, dtype=torch.float64)
            h2 = torch.randn(4, 4, generator=g, dtype=torch.float64)
            assert abs(loss_fn(h1, h2, torch.tensor(index)).item() - value) <= 1e-12 * value


def test_state_is_buffers_and_can_freeze():
    loss_fn = mk.GCLoss_v1(N=8, enable_isogclr=True, backend="cpu")
    assert {"u", "learnable_tau", "grad_tau"} <= set(loss_fn.state_dict())
    h1, h2 = torch.randn(4, 3), torch.randn(4, 3)
    with torch.no_grad():  # LibAUC updates the state under no_grad too
        loss_fn(h1, h2, torch.tensor([0, 1, 2, 3]))
    assert loss_fn.u[:4].abs().sum() > 0
    saved = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    fresh = mk.GCLoss_v1(N=8, enable_isogclr=True, backend="cpu")
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.u, loss_fn.u) and torch.equal(fresh.learnable_tau,
                                                           loss_fn.learnable_tau)
    missing = fresh.load_state_dict({}, strict=False)  # a LibAUC-style dict without the state
    assert set(missing.missing_keys) == {"u", "learnable_tau", "grad_tau"}
    fresh.update_state = False
    before = fresh.u.clone()
    fresh(h1, h2, torch.tensor([4, 5, 6, 7]))
    assert torch.equal(fresh.u, before)


def test_float64_inputs_with_float32_state():
    loss_fn = mk.GCLoss_v1(N=6, backend="cpu")
    out = loss_fn(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64),
                  torch.tensor([0, 1, 2]))
    assert out.dtype == torch.float64 and loss_fn.u.dtype == torch.float32
    assert math.isfinite(out.item())


def test_bad_inputs():
    loss_fn = mk.GCLoss_v1(N=6, backend="cpu", validate="full")
    h = torch.randn(3, 4)
    with pytest.raises(ValueError, match="index"):
        loss_fn(h, h, torch.tensor([0, 1, 6]))
    with pytest.raises(ValueError, match="index"):
        loss_fn(h, h, torch.tensor([[0], [1], [2]]))
    with pytest.raises(TypeError, match="index"):
        loss_fn(h, h, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="N"):
        mk.GCLoss_v1(N=0)
    with pytest.raises(ValueError, match="gamma_schedule"):
        mk.GCLoss_v1(gamma_schedule="linear")
    with pytest.raises(ValueError, match="gamma_decay_epochs"):
        mk.GCLoss_v1(gamma_schedule="cosine")
    with pytest.raises(TypeError, match="state_dtype"):
        mk.GCLoss_v1(state_dtype=torch.float16)
