"""SogCLR / iSogCLR: LibAUC's ``GCLoss_v1`` as a drop-in on the fused primitive
(docs/math.md#sogclr-and-isogclr).

Per anchor row ``a`` of layout ``2n`` (``M = 2B`` rows, ``Neg(a)``: the ``2B - 2`` rows that are
neither ``a`` nor its other view), with ``b_a = 1 / tau_a`` (detached: ``tau`` follows its own
update rule, never autograd), one forward pass of the primitive gives ``lse_neg[a]`` and
``eqs[a] = sum_k Q_ak S_ak`` (docs/math.md#per-row-statistic-eqs). Then

    g_a     = exp(lse_neg[a]) / (2B - 2)             (the batch estimate of E_k exp(S_ak / tau_a))
    ubar_a  = (1 - gamma) u[index_a] + gamma g_a      (the moving average; u is per sample)
    r_a     = g_a / max(ubar_a, eps)
    loss    = (1/B) sum_a (r_a eqs[a] - S_a,p(a))     (LibAUC's surrogate: its gradient is
                                                       (1/B)(r_a Q_ak - Y_ak) in S)
    dtau_a  = log ubar_a + rho - r_a b_a eqs[a]       (iSogCLR: the temperature's gradient)

and the state updates ``u[index] <- (ubar_i + ubar_{i+B}) / 2``, ``m[index] <- (1 - beta)
m[index] + beta (dtau_i + dtau_{i+B}) / 2``, ``tau[index] <- clamp(tau[index] - eta m[index],
tau_min, tau_max)``, exactly as LibAUC's code does them (in that order, reading the old ``u`` and
``tau``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from . import _math, primitive
from . import _validate as V
from . import distributed, reference
from ._assembly import layout_blocks
from ._math import compute_dtype
from .primitive import resolve_backend

__all__ = ["GCLoss_v1"]

GAMMA_SCHEDULES = ("constant", "cosine")


class GCLoss_v1(nn.Module):
    """Global contrastive loss (SogCLR) and, with ``enable_isogclr=True``, its individualised
    temperatures (iSogCLR): LibAUC's ``GCLoss_v1`` with the same constructor, ``forward(hidden1,
    hidden2, index)`` and ``adjust_gamma(epoch)``, the same loss, gradients and state updates.

    Differences from LibAUC (docs/math.md#sogclr-and-isogclr):

    - The state (``u``; with iSogCLR ``learnable_tau`` and ``grad_tau``, each ``[N, 1]``) is
      registered as buffers: saved and restored by ``state_dict`` and moved by ``.to()``. A
      state dict saved without them (LibAUC's) loads with ``strict=False``. The buffers live on
      ``device`` (default: the CPU, as LibAUC keeps them); a forward moves the rows it touches.
    - ``state_dtype``: float32 (LibAUC's) unless given; float64 inputs work (LibAUC raises on
      them). ``learnable_tau`` starts at ``tau`` rounded to the state dtype.
    - No prints at construction or in ``adjust_gamma``.
    - ``update_state`` (default ``True``: LibAUC updates the state on every forward, also under
      ``torch.no_grad()``): set it to ``False`` (constructor or attribute) to freeze the state,
      e.g. for an evaluation pass.
    - The first-visit test of the constant schedule (``gamma = 1`` while the batch's ``u`` rows
      sum to 0, before ``adjust_gamma(epoch >= 1)``) is made on the device, without a host sync.
    - ``validate="full"`` checks that ``index`` lies in ``[0, N)`` (a host sync); the default
      makes no data check (an index out of range then fails in the indexing).
    - ``distributed=True`` as LibAUC: the features of every rank are gathered with their
      gradient; ``u`` is updated at every rank's indices, ``learnable_tau`` / ``grad_tau`` only
      at the local ones (so another rank's copy of a sample's temperature is stale if the
      sampler moves it between ranks).
    - Duplicate indices in one batch: the last write wins on the CPU, as in LibAUC; on a GPU the
      order is unspecified.
    """

    def __init__(self, N=100000, tau=0.1, gamma=0.9, eps=1e-8, device=None, distributed=False,
                 enable_isogclr=False, tau_min=0.05, tau_max=0.7, rho=0.3, eta=0.01, beta=0.9,
                 gamma_schedule="constant", gamma_decay_epochs=-1, *, state_dtype=None,
                 update_state=True, backend="auto", validate=True):
        super().__init__()
        if not isinstance(N, int) or isinstance(N, bool) or N < 1:
            raise ValueError(f"N must be a positive int (the data set size), got {N!r}")
        self.N = N
        self.tau = V.check_positive("tau", tau)
        self.gamma_min = V.check_real("gamma", gamma)
        if not 0.0 <= self.gamma_min <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        self.gamma = 1.0
        self.eps = V.check_positive("eps", eps)
        V.check_bool("distributed", distributed)
        V.check_bool("enable_isogclr", enable_isogclr)
        V.check_bool("update_state", update_state)
        self.distributed = distributed
        self.enable_isogclr = enable_isogclr
        self.update_state = update_state
        V.check_choice("gamma_schedule", gamma_schedule, GAMMA_SCHEDULES)
        self.gamma_schedule = gamma_schedule
        if gamma_schedule == "cosine":
            if not isinstance(gamma_decay_epochs, int) or gamma_decay_epochs <= 0:
                raise ValueError(f"gamma_decay_epochs must be a positive int with "
                                 f"gamma_schedule='cosine', got {gamma_decay_epochs!r}")
        self.gamma_decay_epochs = gamma_decay_epochs
        self.backend = V.check_backend(backend)
        V.check_validate(validate)
        self.validate = validate
        state_dtype = torch.float32 if state_dtype is None else state_dtype
        if state_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"state_dtype must be torch.float32 or torch.float64, got "
                            f"{state_dtype!r}")
        self.device = torch.device(device) if device is not None else None
        where = dict(dtype=state_dtype, device=self.device)
        self.register_buffer("u", torch.zeros(N, 1, **where))
        if enable_isogclr:
            self.tau_min = V.check_positive("tau_min", tau_min)
            self.tau_max = V.check_positive("tau_max", tau_max)
            if self.tau_min > self.tau_max:
                raise ValueError(f"tau_min must be <= tau_max, got {tau_min} > {tau_max}")
            self.rho = V.check_real("rho", rho)
            self.eta = V.check_real("eta", eta)
            self.beta = V.check_real("beta", beta)
            self.register_buffer("learnable_tau", torch.full((N, 1), self.tau, **where))
            self.register_buffer("grad_tau", torch.zeros(N, 1, **where))

    def adjust_gamma(self, epoch: int) -> None:
        """LibAUC's schedule: constant (1 at epoch 0, then ``gamma``) or cosine from 1 to ``gamma``
        over ``gamma_decay_epochs``."""
        if self.gamma_schedule == "constant":
            self.gamma = 1.0 if epoch == 0 else self.gamma_min
        elif epoch < self.gamma_decay_epochs:
            self.gamma = float((1 - self.gamma_min) * 0.5 * (
                1 + np.cos(np.pi * epoch / self.gamma_decay_epochs)) + self.gamma_min)
        else:
            self.gamma = self.gamma_min

    def extra_repr(self) -> str:
        return (f"N={self.N}, tau={self.tau}, gamma={self.gamma_min}, "
                f"enable_isogclr={self.enable_isogclr}, backend={self.backend!r}")

    def forward(self, hidden1: Tensor, hidden2: Tensor, index: Tensor) -> Tensor:
        mode = V.check_validate(self.validate)
        V.check_embedding_pair("hidden1", hidden1, "hidden2", hidden2, validate=mode)
        index = _check_index(index, hidden1.shape[0], self.N, hidden1, mode)
        ctx = distributed.context(self.distributed)
        if ctx is not None:
            distributed.check_equal_rows(hidden1.shape[0], hidden1.device, ctx)
        name = resolve_backend(self.backend, hidden1.device, hidden1.shape[1], hidden1.dtype)
        device_type = hidden1.device.type
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._forward(hidden1, hidden2, index, ctx, name)
        return self._forward(hidden1, hidden2, index, ctx, name)

    def _forward(self, hidden1, hidden2, index, ctx, name):
        out_dtype = hidden1.dtype
        wide = compute_dtype(out_dtype)
        device = hidden1.device
        B = hidden1.shape[0]
        state_index = index.to(self.u.device)
        # tau_a of each sample (detached: tau follows iSogCLR's rule, never autograd).
        if self.enable_isogclr:
            tau = self.learnable_tau[state_index, 0].to(device=device, dtype=wide)
        else:
            tau = torch.full((B,), self.tau, dtype=wide, device=device)
        u_old = self.u[state_index, 0].to(device=device, dtype=wide)
        if self.gamma_schedule == "constant" and self.gamma > self.gamma_min:
            # LibAUC: gamma = 1 while the batch's u rows are all zero (a first visit), decided
            # per batch; a device-side select instead of its host sync.
            first_visit = u_old.sum() == 0
            gamma = torch.where(first_visit, torch.ones((), dtype=wide, device=device),
                                torch.full((), self.gamma_min, dtype=wide, device=device))
        else:
            gamma = torch.full((), self.gamma, dtype=wide, device=device)
        if name == "reference":
            loss, u_bar, d_tau = self._reference(hidden1, hidden2, tau, u_old, gamma, ctx, wide)
        else:
            loss, u_bar, d_tau = self._fused(hidden1, hidden2, tau, u_old, gamma, ctx, name)
        if self.update_state:
            self._update_state(index, state_index, u_bar, d_tau, B, ctx)
        return loss.to(out_dtype)

    def _reference(self, hidden1, hidden2, tau, u_old, gamma, ctx, wide):
        """``reference.gcl_loss``; distributed, over every rank's rows (gathered with their
        gradient) with this rank's samples as the anchors."""
        h1, h2, offset = hidden1.to(wide), hidden2.to(wide), 0
        if ctx is not None:
            h1, h2 = (distributed.gather_with_grad(h, ctx) for h in (h1, h2))
            offset = ctx.rank * hidden1.shape[0]
        return reference.gcl_loss(h1, h2, tau, u_old, gamma, eps=self.eps,
                                  rho=self.rho if self.enable_isogclr else 0.0, offset=offset)

    def _fused(self, hidden1, hidden2, tau, u_old, gamma, ctx, name):
        """Loss, ``ubar`` and (iSogCLR) ``dtau`` from one pass of the primitive (``lse_neg``,
        ``eqs``) over the layout-2n blocks every loss uses."""
        u1, u2 = _math.normalize(hidden1), _math.normalize(hidden2)
        B = u1.shape[0]
        tau_rows = torch.cat([tau, tau])  # b_a = 1 / tau_a on rows i and i + B
        inv_temp = 1.0 / tau_rows
        gather = None
        if ctx is not None:
            gather = lambda x: distributed.gather_with_grad(x, ctx)  # noqa: E731
        (block,) = layout_blocks(u1, u2, "2n", ctx, gather)
        total = B * (1 if ctx is None else ctx.world_size)
        n_neg = 2 * total - 2
        s_pos = (block.anchors * block.candidates[block.pos_index]).sum(dim=1)
        candidates = None if block.symmetric else block.candidates
        lse_neg, eqs = primitive.negative_lse(name, block.anchors, candidates, inv_temp,
                                              block.pos_index, block.self_index,
                                              operand_dtype=hidden1.dtype, return_eqs=True)
        with torch.no_grad():
            g_est = torch.exp(lse_neg.detach() - math.log(n_neg))
            u_bar = (1 - gamma) * torch.cat([u_old, u_old]) + gamma * g_est
            ratio = g_est / u_bar.clamp_min(self.eps)
            value = ratio * eqs - s_pos.detach()
        # Surrogate with LibAUC's gradient: upstream tau_a r_a on lse_neg[a] (d lse / d S = b Q)
        # and -1 on S_a,p(a); its value is replaced by LibAUC's (r eqs - S_ap).
        surrogate = (tau_rows * ratio) * lse_neg - s_pos
        per_anchor = value + (surrogate - surrogate.detach())
        d_tau = None
        if self.enable_isogclr:
            with torch.no_grad():
                d_tau = torch.log(u_bar) + self.rho - ratio * inv_temp * eqs
        return per_anchor.sum() / B, u_bar, d_tau

    @torch.no_grad()
    def _update_state(self, index, state_index, u_bar, d_tau, B, ctx):
        u_new = (u_bar[:B] + u_bar[B:]) / 2
        if ctx is not None:  # LibAUC: every rank writes every rank's rows of u
            all_u = distributed.gather_no_grad(u_new, ctx)
            all_index = distributed.gather_no_grad(index, ctx).to(self.u.device)
            self.u[all_index, 0] = all_u.to(self.u.device, self.u.dtype)
        else:
            self.u[state_index, 0] = u_new.to(self.u.device, self.u.dtype)
        if self.enable_isogclr:
            d_tau = ((d_tau[:B] + d_tau[B:]) / 2).to(self.grad_tau.device, self.grad_tau.dtype)
            self.grad_tau[state_index, 0] = ((1.0 - self.beta) * self.grad_tau[state_index, 0]
                                             + self.beta * d_tau)
            self.learnable_tau[state_index, 0] = (
                self.learnable_tau[state_index, 0] - self.eta * self.grad_tau[state_index, 0]
            ).clamp_(min=self.tau_min, max=self.tau_max)


def _check_index(index, rows: int, N: int, like: Tensor, mode: str) -> Tensor:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a 1-D integer tensor of data set indices, got "
                        f"{type(index).__name__}")
    if mode == "none":
        return index
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
    if index.dim() != 1 or index.shape[0] != rows:
        raise ValueError(f"index must have shape [{rows}] (one data set index per row), got "
                         f"{list(index.shape)}")
    if mode == "full" and not V._compiling():
        if index.numel() and (bool((index < 0).any()) or bool((index >= N).any())):
            raise ValueError(f"index must lie in [0, N) = [0, {N}), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
    return index
