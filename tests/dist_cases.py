"""The loss cases of the distributed tests, shared by the ranks (dist_worker.py) and the
single-process expectations (test_distributed.py)."""

from __future__ import annotations

import functools

import torch

import macl_kernels as mk
from macl_kernels import reference
from macl_kernels._cases import LOSS_LAYOUTS, LOSS_CASES

N_GLOBAL = 12  # rows per view of the global batch: divisible by 1, 2, 3, 4 ranks
DIM = 5
BACKENDS = ("reference", "torch", "cpu")  # every CPU backend
REDUCTIONS = ("mean", "sum")  # "none" has no cross-rank meaning beyond the local rows


def global_batch():
    g = torch.Generator().manual_seed(2026)
    base = torch.randn(N_GLOBAL, DIM, generator=g, dtype=torch.float64)
    z1 = base + 0.6 * torch.randn(N_GLOBAL, DIM, generator=g, dtype=torch.float64)
    z2 = base + 0.6 * torch.randn(N_GLOBAL, DIM, generator=g, dtype=torch.float64)
    return z1, z2, torch.tensor(5.0, dtype=torch.float64)


def run_case(case, layout, z1, z2, scale, **kwargs):
    """Loss and gradients wrt ``z1``, ``z2`` (and the scale for CLIP) of the registry's loss
    ``case`` (``macl_kernels._cases``) on fresh leaves."""
    leaves = [z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()]
    if case.uses_logit_scale:
        leaves.append(scale.detach().clone().requires_grad_())
        loss = case.call(leaves[0], leaves[1], layout, logit_scale=leaves[2], **kwargs)
    else:
        loss = case.call(leaves[0], leaves[1], layout, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def row_labels(z1):
    """Labels that are a function of each row (so that a rank's slice of the global batch
    carries its rows' labels): four classes from the signs of two coordinates."""
    return (z1[:, 0] > 0).long() + 2 * (z1[:, 1] > 0).long()


def run_labels_case(name, layout, z1, z2, scale, **kwargs):
    """False-negative masking and SupCon (labels gathered with the candidates)."""
    leaves = [z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()]
    labels = row_labels(z1)
    if name == "supcon":
        loss = mk.supcon_loss(torch.stack(leaves, dim=1), labels, normalize=True,
                              temperature=0.2, base_temperature=0.1, **kwargs)
    else:
        fn = {"infonce_labels": mk.infonce_loss, "dcl_labels": mk.dcl_loss,
              "macl_labels": mk.macl_loss}[name]
        loss = fn(*leaves, layout=layout, labels=labels, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


LABEL_CASES = [("infonce_labels", "2n"), ("dcl_labels", "cross"), ("macl_labels", "cross_sym"),
               ("supcon", "2n")]


def cases():
    """``(key, run)`` pairs for every backend, reduction and (loss, layout) of the registry,
    and the label cases; ``run(z1, z2, scale, gather_distributed=...)``."""
    for backend in BACKENDS:
        for reduction in REDUCTIONS:
            for name, layout in LOSS_LAYOUTS:
                yield (backend, name, layout, reduction), functools.partial(
                    run_case, LOSS_CASES[name], layout, backend=backend, reduction=reduction)
            for name, layout in LABEL_CASES:
                yield (backend, name, layout, reduction), functools.partial(
                    run_labels_case, name, layout, backend=backend, reduction=reduction)


def _model():
    torch.manual_seed(7)
    return torch.nn.Linear(DIM, 4).double()


def ddp_step(local: slice, world_size: int):
    """One DDP backward of a linear encoder with the MACL loss on this rank's rows; returns
    the (averaged) parameter gradients."""
    model = torch.nn.parallel.DistributedDataParallel(_model())
    z1, z2, _ = global_batch()
    n = z1[local].shape[0]
    out = model(torch.cat([z1[local], z2[local]]))
    loss = mk.macl_loss(out[:n], out[n:], gather_distributed=True, backend="torch")
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def single_process_step():
    model = _model()
    z1, z2, _ = global_batch()
    n = z1.shape[0]
    out = model(torch.cat([z1, z2]))
    mk.macl_loss(out[:n], out[n:], backend="torch").backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _run_module(module, z1, z2, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (z1, z2, scale)]
    loss = module(*leaves)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


CLIP_MODES = [(local_loss, with_grad) for local_loss in (False, True) for with_grad in (False, True)]


def clip_module_cases(z1, z2, scale, rank, world_size):
    """OpenCLIP-style ``ClipLoss`` on this rank for every (local_loss, gather_with_grad)."""
    out = {}
    for local_loss, with_grad in CLIP_MODES:
        for backend in BACKENDS:
            module = mk.ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank,
                                 world_size=world_size, backend=backend)
            out[(local_loss, with_grad, backend)] = _run_module(
                module, reference.normalize(z1), reference.normalize(z2), scale)
    return out


def clip_module_expected(z1, z2, scale, rank, world_size, local_loss, with_grad):
    """What OpenCLIP's options mean, from the full matrix: rank ``r``'s loss is the mean over its
    own anchors (``local_loss``) or over all; its feature gradient sums every rank's loss
    (``gather_with_grad``) or only its own."""
    n = z1.shape[0] // world_size
    u1 = reference.normalize(z1).detach().requires_grad_()
    u2 = reference.normalize(z2).detach().requires_grad_()
    s = scale.detach().clone().requires_grad_()
    per_anchor = reference.clip_loss(u1, u2, s, normalize=False, reduction="none")

    def rank_loss(r):
        if not local_loss:
            return per_anchor.mean()
        rows = torch.arange(n) + r * n
        return per_anchor[torch.cat([rows, rows + z1.shape[0]])].mean()

    loss = rank_loss(rank)
    ds = torch.autograd.grad(loss, s, retain_graph=True)[0]
    total = sum(rank_loss(r) for r in range(world_size)) if with_grad else loss
    g1, g2 = torch.autograd.grad(total, [u1, u2])
    local = slice(rank * n, (rank + 1) * n)
    return loss.detach(), g1[local], g2[local], ds
