"""The loss cases of the distributed tests, shared by the ranks (dist_worker.py) and the
single-process expectations (test_distributed.py)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import macl_kernels as mk
from macl_kernels import reference
from macl_kernels.tools.cases import LOSS_LAYOUTS, LOSS_CASES

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
    ``case`` (``macl_kernels.tools.cases``) on fresh leaves."""
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

    if local_loss and not with_grad and world_size > 1:
        # OpenCLIP detaches every gathered row in this mode (the local slice too): the local
        # features get the gradient of their own rows' logits only.
        rows = slice(rank * n, (rank + 1) * n)
        labels = torch.arange(n) + rank * n
        loss = (F.cross_entropy(s * u1[rows] @ u2.detach().T, labels)
                + F.cross_entropy(s * u2[rows] @ u1.detach().T, labels)) / 2
    else:
        loss = rank_loss(rank)
    ds = torch.autograd.grad(loss, s, retain_graph=True)[0]
    total = sum(rank_loss(r) for r in range(world_size)) if with_grad else loss
    g1, g2 = torch.autograd.grad(total, [u1, u2])
    local = slice(rank * n, (rank + 1) * n)
    return loss.detach(), g1[local], g2[local], ds


# --------------------------------------------------------------------------------------------
# lightly's memory bank with gather_distributed, and gathered extra negatives
# --------------------------------------------------------------------------------------------

BANK_SIZE, BANK_STEPS, BANK_SEED = 10, 3, 11


def bank_steps():
    """The global query/key batches of the memory-bank run (every rank builds the same)."""
    g = torch.Generator().manual_seed(BANK_SEED + 1)
    return [(torch.randn(N_GLOBAL, DIM, generator=g, dtype=torch.float64),
             torch.randn(N_GLOBAL, DIM, generator=g, dtype=torch.float64))
            for _ in range(BANK_STEPS)]


def bank_run(local: slice, backend: str):
    """``NTXentLoss(memory_bank_size, gather_distributed=True)`` on this rank's rows, step by step:
    the losses, the query gradients and the bank after the last step."""
    torch.manual_seed(BANK_SEED)  # the same random initial bank on every rank, as lightly
    crit = mk.NTXentLoss(0.2, memory_bank_size=(BANK_SIZE, DIM), gather_distributed=True,
                         backend=backend)
    out = []
    for q, k in bank_steps():
        q = q[local].clone().requires_grad_()
        loss = crit(q, k[local])
        out.append((loss.detach(), torch.autograd.grad(loss, q)[0]))
    return out, crit.bank.clone()


def bank_expected(local: slice):
    """lightly's semantics written out: the loss is local (this rank's queries against the
    pre-step bank), the enqueue takes every rank's normalised keys in rank order (a bank of
    size Q receives W n keys per step; keys past the end are dropped at the wrap)."""
    torch.manual_seed(BANK_SEED)
    bank = F.normalize(torch.randn(BANK_SIZE, DIM), dim=-1)
    ptr, out = 0, []
    for q, k in bank_steps():
        qq = q[local].clone().requires_grad_()
        u_q, u_k = F.normalize(qq, dim=1), F.normalize(k[local], dim=1)
        logits = torch.cat([(u_q * u_k).sum(1, keepdim=True), u_q @ bank.double().T], 1) / 0.2
        loss = F.cross_entropy(logits, torch.zeros(u_q.shape[0], dtype=torch.long))
        out.append((loss.detach(), torch.autograd.grad(loss, qq)[0]))
        keys = F.normalize(k, dim=1).float()
        if ptr + keys.shape[0] >= BANK_SIZE:
            bank[ptr:] = keys[:BANK_SIZE - ptr]
            ptr = 0
        else:
            bank[ptr:ptr + keys.shape[0]] = keys
            ptr += keys.shape[0]
    return out, bank


NEGATIVES_PER_RANK = 2


def rank_negatives(world_size: int):
    """Every rank's extra negatives (the same K' on each), concatenated in rank order."""
    g = torch.Generator().manual_seed(2027)
    return torch.randn(world_size * NEGATIVES_PER_RANK, DIM, generator=g, dtype=torch.float64)


def negatives_run(z1, z2, negatives, backend, **kwargs):
    """InfoNCE, layout cross, with extra negatives: loss and gradients of z1, z2, negatives."""
    leaves = [t.detach().clone().requires_grad_() for t in (z1, z2, negatives)]
    loss = mk.infonce_loss(leaves[0], leaves[1], layout="cross", negatives=leaves[2],
                           backend=backend, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


SIGLIP_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")
SIGLIP_BIAS = -3.0


def siglip_module_cases(z1, z2, scale, rank, world_size):
    """OpenCLIP-style ``SigLipLoss`` on this rank for every ``dist_impl`` and backend: loss and
    the gradients of image rows, text rows, scale and bias (this rank's rows)."""
    out = {}
    bias = torch.tensor(SIGLIP_BIAS, dtype=torch.float64)
    for dist_impl in SIGLIP_DIST_IMPLS:
        for backend in BACKENDS:
            module = mk.SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl,
                                   backend=backend)
            leaves = [t.detach().clone().requires_grad_() for t in
                      (reference.normalize(z1), reference.normalize(z2), scale, bias)]
            loss = module(*leaves)
            out[(dist_impl, backend)] = (loss.detach(), *torch.autograd.grad(loss, leaves))
    return out


def siglip_module_expected(z1, z2, scale):
    """The single-process ``SigLipLoss`` of the global batch and its four gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in
              (reference.normalize(z1), reference.normalize(z2), scale,
               torch.tensor(SIGLIP_BIAS, dtype=torch.float64))]
    loss = reference.siglip_loss(*leaves, normalize=False)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def moco_bank():
    g = torch.Generator().manual_seed(2028)
    return F.normalize(torch.randn(7, DIM, generator=g, dtype=torch.float64), dim=1)


def moco_macl_run(q, k, backend, **kwargs):
    """MACL with a queue (``moco_loss(loss="macl")``): loss and gradients of q and k."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    loss = mk.moco_loss(leaves[0], leaves[1], moco_bank(), loss="macl", backend=backend,
                        **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))
