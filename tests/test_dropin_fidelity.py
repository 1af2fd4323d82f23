"""Drop-in fidelity: the behaviours that lightly's and OpenCLIP's own loss tests check, written
as this suite's tests (docs/math.md#memory-bank-moco, #extra-negatives,
#drop-in-edge-behaviour, #validation-and-host-synchronisation).

The peers are not installed: their formulas and state machines are transcribed below, small and
literal (float64, full matrices), and compared with the package's modules and functions:

- lightly's ``NTXentLoss`` with a memory bank (``MemoryBankModule``: random initial rows, the
  bank as it was before the step, enqueue of the normalised keys when ``out0`` requires grad, the
  pointer's wrap that drops the keys past the end), step by step, losses, gradients and bank;
- the edge behaviour of every drop-in (a batch of one, negative temperatures, NaN/Inf);
- OpenCLIP's ``ClipLoss.forward(image, text, logit_scale, logit_bias=None, output_dict=False)``,
  ``get_logits``/``get_ground_truth`` and subclasses written against them (CoCa, distillation);
- extra (hard) negatives against sentence-transformers' ``MultipleNegativesRankingLoss`` formula
  and every layout against the reference; ``moco_loss`` (InfoNCE, DCL, MACL with a queue);
- the default call path reads no tensor data on the host (no host-device synchronisation).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import macl_kernels as mk
from conftest import (
    COMPUTE_BACKENDS, F32_RTOL, F64_RTOL, HAS_CUDA, assert_rel_close, assert_same_results,
    kernel_backends, loss_and_grads, make_pair,
)

KERNELS = tuple(b for b in kernel_backends() if b != "triton") + (
    ("triton",) if "triton" in kernel_backends() else ())
LAYOUTS = ("2n", "cross", "cross_sym")


def grads_of(fn, *tensors):
    """``(value, *grads)`` of ``fn(*tensors)`` on fresh leaves (``None`` grads become zeros)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return (out.detach(),) + tuple(torch.zeros_like(t) if g is None else g
                                   for t, g in zip(leaves, grads))


# --------------------------------------------------------------------------------------------
# lightly's memory bank, transcribed (MemoryBankModule + NTXentLoss's bank branch)
# --------------------------------------------------------------------------------------------


class LightlyBankNTXent:
    """lightly's NTXentLoss(temperature, memory_bank_size) with a bank: same RNG draws."""

    def __init__(self, temperature, size, dtype=torch.float32):
        self.temperature, self.size, self.dtype = temperature, tuple(size), dtype
        self.bank = None
        if len(self.size) > 1:
            self._init(self.size)

    def _init(self, size):
        self.bank = F.normalize(torch.randn(size).to(self.dtype), dim=-1)
        self.ptr = 0

    def __call__(self, out0, out1):
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        if self.bank is None:
            self._init((self.size[0], out1.shape[1]))
        bank = self.bank.clone()
        if out0.requires_grad:
            keys, p, q = out1.detach(), self.ptr, self.size[0]
            if p + keys.shape[0] >= q:
                self.bank[p:] = keys[:q - p].to(self.dtype)
                self.ptr = 0
            else:
                self.bank[p:p + keys.shape[0]] = keys.to(self.dtype)
                self.ptr = p + keys.shape[0]
        pos = (out0 * out1).sum(1, keepdim=True)
        logits = torch.cat([pos, out0 @ bank.T.to(out0.dtype)], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(out0.shape[0], dtype=torch.long))


def official_macl(pos, neg, tau_0, alpha, A0):
    """The official MACL function (pos [N, 1], neg [N, K] similarities)."""
    A = pos.detach().mean()
    tau = tau_0 * (1.0 + alpha * (A - A0))
    P = torch.softmax(torch.cat([pos, neg], dim=1) / tau, dim=1)[:, 0]
    return (-(1.0 / (1.0 - P)).detach() * torch.log(P)).mean()


def steps(seed, size, n, d, count, keys_grad=False):
    """The query/key sequence of the lightly reference cases (float64)."""
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(count):
        q = torch.randn(n, d, generator=g, dtype=torch.float64)
        k = torch.randn(n, d, generator=g, dtype=torch.float64)
        yield q, k


# Reference losses of lightly 1.6.0's NTXentLoss(temperature, (Q, D)).double() after
# torch.manual_seed(s), per step (docs/math.md#memory-bank-moco).
LIGHTLY_BANK_CASES = [
    (0, 8, 4, 4, 0.1, False, [12.3230853789447, 7.75946237342147, 8.17400429426135,
                              9.61324634254003]),
    (1, 6, 3, 4, 0.2, False, [2.89050695677932, 4.50486621095775, 6.98770040407475]),
    (2, 5, 5, 3, 0.5, True, [1.70630796376321, 1.85831606855339]),
]


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("case", LIGHTLY_BANK_CASES, ids=["M1-fills", "M2-drops", "M3-keygrad"])
def test_memory_bank_reference_losses(case, backend):
    seed, size, d, n, temperature, keys_grad, want = case
    torch.manual_seed(seed)
    crit = mk.NTXentLoss(temperature, memory_bank_size=(size, d), backend=backend).double()
    for (q, k), expected in zip(steps(seed, size, n, d, len(want)), want):
        q.requires_grad_()
        k.requires_grad_(keys_grad)
        assert crit(q, k).item() == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("size,n,bare", [((6, 3), 4, False), ((5, 3), 5, False),
                                         ((16, 3), 3, False), ((7, 3), 9, False),
                                         ((6, 3), 4, True)],
                         ids=["wrap-drops", "exact-fill", "no-wrap", "batch>bank", "bare-int"])
def test_memory_bank_step_by_step_as_lightly(size, n, bare, backend):
    """Losses, gradients of both views and the bank itself equal lightly's, step by step, from
    the same seed (construction-time draws for (size, dim), first-call draws for a bare size)."""
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if bare else "error")
        ours = mk.NTXentLoss(0.3, memory_bank_size=size[0] if bare else size, backend=backend)
    torch.manual_seed(3)
    theirs = LightlyBankNTXent(0.3, (size[0],) if bare else size)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        q = torch.randn(n, size[1], generator=g, dtype=torch.float64)
        k = torch.randn(n, size[1], generator=g, dtype=torch.float64)
        torch.manual_seed(4)  # a bare size draws the bank at the first call
        got = grads_of(ours, q, k)
        torch.manual_seed(4)
        want = grads_of(theirs, q, k)
        assert_same_results(got, want, F64_RTOL, names=("loss", "dq", "dk"))
        assert torch.equal(ours.bank, theirs.bank), f"step {step}"
        assert ours.bank.dtype == torch.float32 and int(ours.bank_ptr) == theirs.ptr


def test_memory_bank_updates_only_when_queries_need_grad():
    torch.manual_seed(0)
    crit = mk.NTXentLoss(memory_bank_size=(8, 4))
    before = crit.bank.clone()
    q, k = make_pair(3, 4, seed=1)
    crit(q, k)  # no gradient wanted: an evaluation pass
    with torch.no_grad():
        crit(q.requires_grad_(), k)
    assert torch.equal(crit.bank, before) and int(crit.bank_ptr) == 0
    loss = crit(q, k)
    assert int(crit.bank_ptr) == 3 and not torch.equal(crit.bank, before)
    loss.backward()  # the in-place enqueue after the loss does not disturb its backward
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_memory_bank_is_not_in_the_state_dict_unless_asked():
    torch.manual_seed(0)
    crit = mk.NTXentLoss(memory_bank_size=(8, 4))
    assert "bank" not in crit.state_dict() and "bank_ptr" not in crit.state_dict()
    crit.load_state_dict({})  # a checkpoint without the bank loads (and one with it, strict=False)
    kept = mk.NTXentLoss(memory_bank_size=(8, 4), persistent_bank=True)
    q, k = make_pair(3, 4, seed=2)
    kept(q.requires_grad_(), k)
    state = kept.state_dict()
    assert set(state) == {"bank", "bank_ptr"}
    torch.manual_seed(1)
    resumed = mk.NTXentLoss(memory_bank_size=(8, 4), persistent_bank=True)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.bank, kept.bank) and int(resumed.bank_ptr) == 3
    q2, k2 = make_pair(3, 4, seed=3)
    assert resumed(q2, k2).item() == kept(q2, k2).item()
    crit.load_state_dict(state, strict=False)
    with pytest.warns(UserWarning):
        lazy = mk.NTXentLoss(memory_bank_size=8, persistent_bank=True)
    lazy.load_state_dict(state)  # a bare size takes the checkpoint's width
    assert torch.equal(lazy.bank, kept.bank)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_memory_bank_casts_per_call(dtype):
    """lightly raises for queries that are not float32 (its bank is); here the bank is cast
    per call and stays float32."""
    torch.manual_seed(0)
    crit = mk.NTXentLoss(memory_bank_size=(8, 4))
    q, k = make_pair(3, 4, seed=4)
    loss = crit(q.to(dtype).requires_grad_(), k.to(dtype))
    assert loss.dtype == dtype and torch.isfinite(loss) and crit.bank.dtype == torch.float32


def test_memory_bank_bad_sizes():
    with pytest.raises(ValueError, match="non-negative"):
        mk.NTXentLoss(memory_bank_size=-1)
    with pytest.raises(TypeError, match="memory_bank_size"):
        mk.NTXentLoss(memory_bank_size=(4.0, 2))
    crit = mk.NTXentLoss(memory_bank_size=(0, 4))  # disabled, as lightly: the SimCLR loss
    z0, z1 = make_pair(4, 4, seed=5)
    assert not crit.uses_memory_bank
    assert crit(z0, z1).item() == mk.NTXentLoss()(z0, z1).item()


# --------------------------------------------------------------------------------------------
# moco_loss: the functional form, every loss and every kernel backend
# --------------------------------------------------------------------------------------------


def lightly_moco(q, k, bank, temperature, in_batch=False):
    """The bank branch of lightly's NTXentLoss (and, with in_batch, the other keys too)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    neg = q @ bank.T.to(q.dtype)
    if in_batch:
        off = ~torch.eye(q.shape[0], dtype=torch.bool)
        neg = torch.cat([(q @ k.T)[off].view(q.shape[0], -1), neg], dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


@pytest.mark.parametrize("backend", ("reference",) + KERNELS)
@pytest.mark.parametrize("in_batch", [False, True], ids=["bank", "bank+batch"])
@pytest.mark.parametrize("n,q_size,d", [(1, 5, 3), (6, 40, 8)])
def test_moco_infonce_matches_lightly(n, q_size, d, in_batch, backend):
    if in_batch and n == 1:
        pytest.skip("one query has no other key")
    q, k = make_pair(n, d, seed=n + q_size)
    bank = F.normalize(torch.randn(q_size, d, generator=torch.Generator().manual_seed(1)), dim=1)
    got = grads_of(lambda a, b: mk.moco_loss(a, b, bank, temperature=0.2,
                                             in_batch_negatives=in_batch, backend=backend), q, k)
    want = grads_of(lambda a, b: lightly_moco(a, b, bank, 0.2, in_batch), q, k)
    assert_same_results(got, want, F64_RTOL, names=("loss", "dq", "dk"))


@pytest.mark.parametrize("backend", ("reference",) + KERNELS)
def test_moco_macl_and_dcl(backend):
    """MACL with a queue as the official MACL code (A over the query-key pairs only) and DCL's
    row formula on the same x_a."""
    q, k = make_pair(5, 6, seed=8)
    bank = F.normalize(torch.randn(11, 6, generator=torch.Generator().manual_seed(2),
                                   dtype=torch.float64), dim=1)

    def official(a, b):
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        return official_macl((a * b).sum(1, keepdim=True), a @ bank.T, 0.15, 0.5, 0.2)

    def dcl(a, b):
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        return (torch.logsumexp(a @ bank.T / 0.3, dim=1) - (a * b).sum(1) / 0.3).mean()

    got = grads_of(lambda a, b: mk.moco_loss(a, b, bank, loss="macl", temperature=0.15,
                                             alpha=0.5, a0=0.2, backend=backend), q, k)
    assert_same_results(got, grads_of(official, q, k), 1e-12, names=("loss", "dq", "dk"))
    got = grads_of(lambda a, b: mk.moco_loss(a, b, bank, loss="dcl", temperature=0.3,
                                             backend=backend), q, k)
    assert_same_results(got, grads_of(dcl, q, k), F64_RTOL, names=("loss", "dq", "dk"))


def test_moco_macl_queue_reference_values():
    """The official MACL function on lightly's M1 sequence (pre-step bank), reference values."""
    for (t0, alpha, a0), want in [((0.1, 0.5, 0.0), [15.3692809787068, 7.88119276540462,
                                                      8.49322188054002]),
                                  ((0.15, 0.5, 0.2), [11.8353770713765, 6.05025707911026,
                                                      6.53044889240461])]:
        torch.manual_seed(0)
        bank_module = mk.NTXentLoss(0.1, memory_bank_size=(8, 4)).double()
        for (q, k), expected in zip(steps(0, 8, 4, 4, 3), want):
            got = mk.moco_loss(q, k, bank_module.bank, loss="macl", temperature=t0, alpha=alpha,
                               a0=a0)
            assert got.item() == pytest.approx(expected, rel=1e-13)
            bank_module(q.requires_grad_(), k)  # the enqueue of the step


def test_moco_bank_may_change_after_the_call():
    """Nothing of the bank is saved for backward: overwriting it before backward changes
    nothing (the module's enqueue relies on this instead of copying the bank)."""
    q, k = make_pair(4, 5, seed=9)
    bank = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1)
    want = grads_of(lambda a, b: mk.moco_loss(a, b, bank.clone(), backend="torch"), q, k)
    for backend in KERNELS:
        leaves = [t.clone().requires_grad_() for t in (q, k)]
        scratch = bank.clone()
        loss = mk.moco_loss(*leaves, scratch, backend=backend)
        scratch.normal_()
        got = (loss.detach(),) + torch.autograd.grad(loss, leaves)
        assert_same_results(got, want, F64_RTOL, names=("loss", "dq", "dk"))


def test_moco_argument_checks():
    q, k = make_pair(3, 4)
    with pytest.raises(ValueError, match="no negative"):
        mk.moco_loss(q, k, torch.empty(0, 4))
    with pytest.raises(ValueError, match="bank"):
        mk.moco_loss(q, k, torch.randn(5, 3))
    with pytest.raises(TypeError, match="bank"):
        mk.moco_loss(q, k, [[1.0] * 4])
    with pytest.raises(ValueError, match="loss"):
        mk.moco_loss(q, k, torch.randn(5, 4), loss="supcon")
    with pytest.raises(ValueError, match="temperature"):
        mk.moco_loss(q, k, torch.randn(5, 4), temperature=-0.1)
    # one query against a bank is valid; an empty bank with in-batch keys is too (N >= 2)
    assert torch.isfinite(mk.moco_loss(q[:1], k[:1], torch.randn(5, 4)))
    assert torch.isfinite(mk.moco_loss(q, k, torch.empty(0, 4), in_batch_negatives=True))


# --------------------------------------------------------------------------------------------
# Extra negatives in the functional API
# --------------------------------------------------------------------------------------------


def mnrl(anchors, positives, negatives, scale):
    """sentence-transformers' MultipleNegativesRankingLoss: cosine scores of every anchor
    against [positives; all hard negatives] times scale, cross-entropy with label i."""
    a = F.normalize(anchors, dim=1)
    c = F.normalize(torch.cat([positives, negatives]), dim=1)
    return F.cross_entropy(scale * a @ c.T, torch.arange(a.shape[0]))


@pytest.mark.parametrize("backend", ("reference",) + KERNELS)
@pytest.mark.parametrize("n,h", [(1, 1), (4, 1), (5, 3)])
def test_hard_negatives_are_mnrl(n, h, backend):
    a, p = make_pair(n, 6, seed=10 * n + h)
    neg = torch.randn(n * h, 6, generator=torch.Generator().manual_seed(h), dtype=torch.float64)
    got = grads_of(lambda x, y, z: mk.infonce_loss(x, y, layout="cross", temperature=1 / 5.0,
                                                   negatives=z, backend=backend), a, p, neg)
    want = grads_of(lambda x, y, z: mnrl(x, y, z, 5.0), a, p, neg)
    assert_same_results(got, want, F64_RTOL, names=("loss", "da", "dp", "dneg"))


CALLS = {
    "infonce": lambda z1, z2, layout, **kw: mk.infonce_loss(z1, z2, layout=layout, **kw),
    "dcl": lambda z1, z2, layout, **kw: mk.dcl_loss(z1, z2, layout=layout, **kw),
    "dclw": lambda z1, z2, layout, **kw: mk.dcl_loss(z1, z2, layout=layout, weighted=True, **kw),
    "macl": lambda z1, z2, layout, **kw: mk.macl_loss(z1, z2, layout=layout, **kw),
    "tfree": lambda z1, z2, layout, **kw: mk.tfree_loss(z1, z2, layout=layout, **kw),
    "clip": lambda z1, z2, layout, **kw: mk.clip_loss(z1, z2, 7.5, **kw),
}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_extra_negatives_match_reference(name, layout, backend):
    if name == "clip" and layout != "cross_sym":
        pytest.skip("CLIP has one layout")
    z1, z2 = make_pair(5, 4, seed=11)
    neg = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = grads_of(lambda a, b, c: CALLS[name](a, b, layout, negatives=c, backend=backend),
                   z1, z2, neg)
    want = grads_of(lambda a, b, c: CALLS[name](a, b, layout, negatives=c, backend="reference"),
                    z1, z2, neg)
    assert_same_results(got, want, F64_RTOL, names=("loss", "dz1", "dz2", "dneg"))


def test_extra_negatives_reach_the_right_anchors():
    """2n: every anchor sees them; cross_sym: the row (z1) direction only."""
    z1, z2 = make_pair(4, 3, seed=12)
    neg = torch.randn(2, 3, dtype=torch.float64)
    u1, u2, un = (F.normalize(t, dim=1) for t in (z1, z2, neg))
    rows = mk.infonce_loss(z1, z2, layout="cross_sym", negatives=neg, reduction="none")
    want_rows = F.cross_entropy(torch.cat([u1 @ u2.T, u1 @ un.T], 1) / 0.1, torch.arange(4),
                                reduction="none")
    want_cols = F.cross_entropy(u2 @ u1.T / 0.1, torch.arange(4), reduction="none")
    assert_rel_close(rows, torch.cat([want_rows, want_cols]), F64_RTOL)
    U = torch.cat([u1, u2])
    logits = (U @ torch.cat([U, un]).T / 0.1).fill_diagonal_(float("-inf"))
    want = F.cross_entropy(logits, (torch.arange(8) + 4) % 8, reduction="none")
    assert_rel_close(mk.infonce_loss(z1, z2, negatives=neg, reduction="none"), want, F64_RTOL)


def test_extra_negatives_argument_checks():
    z1, z2 = make_pair(3, 4)
    with pytest.raises(ValueError, match="negatives"):
        mk.infonce_loss(z1, z2, negatives=torch.randn(2, 5))
    with pytest.raises(TypeError, match="negatives"):
        mk.infonce_loss(z1, z2, negatives=torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="negatives"):
        mk.infonce_loss(z1, z2, negatives=[[0.0] * 4])
    one1, one2 = z1[:1], z2[:1]
    with pytest.raises(ValueError, match="no negative"):
        mk.infonce_loss(one1, one2, layout="cross")
    for layout in ("2n", "cross"):  # a batch of one with a hard negative is valid
        assert torch.isfinite(mk.infonce_loss(one1, one2, layout=layout,
                                              negatives=torch.randn(1, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="no negative"):  # the column direction has none
        mk.infonce_loss(one1, one2, layout="cross_sym", negatives=torch.randn(1, 4))
    # float32 negatives with float64 embeddings are cast (as a bank is)
    assert mk.infonce_loss(z1, z2, negatives=torch.randn(2, 4)).dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Edge behaviour of the drop-ins: the peers'
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("name,want", [("NTXentLoss", 0.0), ("MACLLoss", 0.0),
                                       ("ClipLoss", 0.0), ("DCLLoss", -math.inf),
                                       ("DCLWLoss", -math.inf)])
def test_batch_of_one(name, want, backend):
    """lightly's NTXent and MACL and OpenCLIP's ClipLoss return 0 (their logits hold the
    positive alone), connected to the graph with zero gradients; lightly's DCL/DCLW return
    -inf (the log-sum-exp over no negatives), kept as lightly computes it."""
    z0, z1 = (t.requires_grad_() for t in make_pair(1, 5, seed=13))
    crit = getattr(mk, name)(backend=backend)
    loss = crit(z0, z1, 10.0) if name == "ClipLoss" else crit(z0, z1)
    assert loss.item() == want and loss.requires_grad
    if want == 0.0:
        loss.backward()
        assert torch.equal(z0.grad, torch.zeros_like(z0))


def lightly_ntxent(out0, out1, temperature):
    u = F.normalize(torch.cat([out0, out1]), dim=1)
    n = out0.shape[0]
    logits = (u @ u.T / temperature).fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, (torch.arange(2 * n) + n) % (2 * n))


def lightly_dcl(out0, out1, temperature):
    u0, u1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    n = u0.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)

    def one(a, b):
        neg = torch.cat([(a @ a.T)[off].view(n, -1), (a @ b.T)[off].view(n, -1)], 1)
        return (torch.logsumexp(neg / temperature, 1) - (a * b).sum(1) / temperature).mean()

    return 0.5 * (one(u0, u1) + one(u1, u0))


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("temperature", [-1.0, -0.2])
def test_negative_temperature_computed_as_lightly(temperature, backend):
    z0, z1 = make_pair(5, 4, seed=14)
    got = loss_and_grads(mk.NTXentLoss(temperature, backend=backend), z0, z1)
    assert_same_results(got, loss_and_grads(lambda a, b: lightly_ntxent(a, b, temperature),
                                            z0, z1), F64_RTOL)
    got = loss_and_grads(mk.DCLLoss(temperature, backend=backend), z0, z1)
    assert_same_results(got, loss_and_grads(lambda a, b: lightly_dcl(a, b, temperature),
                                            z0, z1), F64_RTOL)
    torch.manual_seed(0)
    bank = mk.NTXentLoss(temperature, memory_bank_size=(6, 4), backend=backend)
    torch.manual_seed(0)
    theirs = LightlyBankNTXent(temperature, (6, 4))
    assert_same_results(grads_of(bank, z0, z1), grads_of(theirs, z0, z1), F64_RTOL)
    with pytest.raises(ValueError, match="temperature"):  # the functional API refuses it
        mk.infonce_loss(z0, z1, temperature=temperature)


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate_in_every_dropin(value, backend):
    z0, z1 = make_pair(4, 3, seed=15)
    z0[1, 2] = value
    torch.manual_seed(0)
    modules = [mk.NTXentLoss(backend=backend), mk.MACLLoss(backend=backend),
               mk.DCLLoss(backend=backend), mk.DCLWLoss(backend=backend),
               mk.NTXentLoss(memory_bank_size=(8, 3), backend=backend)]
    for crit in modules:
        assert not torch.isfinite(crit(z0, z1)), type(crit).__name__
    assert not torch.isfinite(mk.ClipLoss(backend=backend)(z0, z1, 10.0))


# --------------------------------------------------------------------------------------------
# OpenCLIP's ClipLoss interface
# --------------------------------------------------------------------------------------------


def openclip_loss(image, text, scale, bias=None):
    logits_i = scale * image @ text.T
    logits_t = scale * text @ image.T
    if bias is not None:
        logits_i, logits_t = logits_i + bias, logits_t + bias
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


@pytest.mark.parametrize("backend", COMPUTE_BACKENDS)
def test_clip_logit_bias(backend):
    """A scalar bias cancels in both softmaxes: the loss and feature gradients are unchanged and
    the bias gets a zero gradient (not None), as with OpenCLIP."""
    image, text = (F.normalize(t, dim=1) for t in make_pair(6, 5, seed=16))
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    crit = mk.ClipLoss(backend=backend)
    got = grads_of(lambda i, t, s, b: crit(i, t, s, b), image, text, scale, bias)
    want = grads_of(openclip_loss, image, text, scale, bias)
    assert_same_results(got[:4], want[:4], F64_RTOL, names=("loss", "di", "dt", "ds"))
    assert got[4].item() == 0.0 and abs(want[4].item()) < 1e-12
    with pytest.raises(ValueError, match="logit_bias"):
        crit(image, text, scale, torch.zeros(6, dtype=torch.float64))


def test_clip_positional_calls_as_openclip():
    image, text = (F.normalize(t, dim=1) for t in make_pair(4, 3, seed=17))
    crit, want = mk.ClipLoss(), openclip_loss(image, text, 5.0)
    out = crit(image, text, 5.0, None, True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].item() == \
        pytest.approx(want.item(), rel=1e-12)
    out = crit(image, text, 5.0, True)  # OpenCLIP: logit_bias=True, a tensor comes back
    assert isinstance(out, torch.Tensor) and out.item() == pytest.approx(want.item(), rel=1e-12)
    model_out = dict(image_features=image, text_features=text,
                     logit_scale=torch.tensor(5.0, dtype=torch.float64),
                     logit_bias=torch.tensor(-2.0, dtype=torch.float64))
    out = crit(**model_out, output_dict=True)
    assert out["contrastive_loss"].item() == pytest.approx(want.item(), rel=1e-12)
    # a negative float scale is computed with, as OpenCLIP does
    assert crit(image, text, -3.0).item() == pytest.approx(
        openclip_loss(image, text, -3.0).item(), rel=1e-12)


def test_clip_get_logits_and_ground_truth():
    image, text = make_pair(5, 3, seed=18)
    crit = mk.ClipLoss(cache_labels=True)
    li, lt = crit.get_logits(image, text, 2.0, logit_bias=1.0)
    assert torch.equal(li, 2.0 * image @ text.T + 1.0) and torch.equal(lt, 2.0 * text @ image.T
                                                                       + 1.0)
    labels = crit.get_ground_truth(image.device, 5)
    assert torch.equal(labels, torch.arange(5)) and crit.get_ground_truth(image.device, 5) is labels
    assert crit.prev_num_logits == 5 and torch.equal(
        mk.ClipLoss().get_ground_truth(image.device, 3), torch.arange(3))


class CoCaStyleLoss(mk.ClipLoss):
    """A subclass written against OpenCLIP's ClipLoss the way OpenCLIP's CoCaLoss is: its own
    constructor arguments, ``super().forward(image, text, logit_scale)`` and a caption loss."""

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id=0, **kwargs):
        super().__init__(**kwargs)
        self.caption_loss_weight, self.clip_loss_weight = caption_loss_weight, clip_loss_weight
        self.caption_loss = torch.nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale,
                output_dict=False):
        clip = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        caption = self.caption_loss_weight * self.caption_loss(logits.permute(0, 2, 1), labels)
        return {"contrastive_loss": clip, "caption_loss": caption} if output_dict else \
            (clip, caption)


class DistillStyleLoss(mk.ClipLoss):
    """A subclass built on ``get_logits`` / ``get_ground_truth``, as OpenCLIP's DistillClipLoss."""

    def forward(self, image_features, text_features, logit_scale, dist_image_features,
                dist_text_features, dist_logit_scale, output_dict=False):
        li, lt = self.get_logits(image_features, text_features, logit_scale)
        dli, dlt = self.get_logits(dist_image_features, dist_text_features, dist_logit_scale)
        labels = self.get_ground_truth(image_features.device, li.shape[0])
        contrastive = (F.cross_entropy(li, labels) + F.cross_entropy(lt, labels)) / 2

        def soft_ce(teacher, student):
            return -(teacher.softmax(1) * student.log_softmax(1)).sum(1).mean()

        distill = (soft_ce(dli, li) + soft_ce(dlt, lt)) / 2
        return (contrastive, distill) if not output_dict else {
            "contrastive_loss": contrastive, "distill_loss": distill}


def test_openclip_style_subclasses_work_on_our_class():
    image, text = (F.normalize(t, dim=1) for t in make_pair(4, 6, seed=19))
    logits = torch.randn(4, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 7))
    clip, caption = CoCaStyleLoss(2.0, 1.5)(image, text, logits, labels, 8.0)
    assert clip.item() == pytest.approx(1.5 * openclip_loss(image, text, 8.0).item(), rel=1e-12)
    assert caption.item() == pytest.approx(
        2.0 * F.cross_entropy(logits.permute(0, 2, 1), labels).item(), rel=1e-12)
    out = DistillStyleLoss()(image, text, 8.0, text, image, 3.0, output_dict=True)
    assert out["contrastive_loss"].item() == pytest.approx(
        openclip_loss(image, text, 8.0).item(), rel=1e-12)
    assert torch.isfinite(out["distill_loss"])


# --------------------------------------------------------------------------------------------
# No host synchronisation on the default path
# --------------------------------------------------------------------------------------------


class HostReadError(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Make every Python-level read of tensor data raise: ``item``, ``tolist``, ``numpy``,
    ``bool``/``int``/``float``/``index`` conversion. On a GPU each of these is a host-device
    synchronisation; on the CPU this is the closest equivalent (kernels' own C++ is not seen)."""
    names = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} called on the default call path")
        return read

    for name in names:
        setattr(torch.Tensor, name, forbidden(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _default_calls(backend, device="cpu"):
    z1, z2 = (t.to(device) for t in make_pair(6, 5, seed=20))
    neg = torch.randn(3, 5, dtype=torch.float64).to(device)
    bank = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1).to(device)
    scale = torch.tensor(10.0, dtype=torch.float64, device=device, requires_grad=True)
    torch.manual_seed(0)
    ntx_bank = mk.NTXentLoss(memory_bank_size=(8, 5), backend=backend).to(device)
    calls = {
        "infonce": lambda a, b: mk.infonce_loss(a, b, backend=backend),
        "infonce-negatives": lambda a, b: mk.infonce_loss(a, b, layout="cross", negatives=neg,
                                                          backend=backend),
        "dclw": lambda a, b: mk.dcl_loss(a, b, weighted=True, backend=backend),
        "macl": lambda a, b: mk.macl_loss(a, b, backend=backend),
        "tfree": lambda a, b: mk.tfree_loss(a, b, backend=backend),
        "clip": lambda a, b: mk.clip_loss(a, b, scale, backend=backend),
        "moco-macl": lambda a, b: mk.moco_loss(a, b, bank, loss="macl", backend=backend),
        "NTXentLoss": mk.NTXentLoss(backend=backend),
        "NTXentLoss-bank": ntx_bank,
        "MACLLoss": mk.MACLLoss(backend=backend),
        "DCLWLoss": mk.DCLWLoss(backend=backend),
        "ClipLoss": lambda a, b: mk.ClipLoss(backend=backend)(a, b, scale, scale * 0.1),
        "siglip": lambda a, b: mk.siglip_loss(a, b, scale, scale * -0.5, backend=backend),
        "SigLipLoss": lambda a, b: mk.SigLipLoss(backend=backend)(a, b, scale, -1.0),
    }
    return z1, z2, calls


@pytest.mark.parametrize("backend", [b for b in KERNELS if b in ("torch", "cpu")])
def test_default_path_reads_no_tensor_data(backend):
    z1, z2, calls = _default_calls(backend)
    for name, fn in calls.items():
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        with no_host_reads():
            for _ in range(2):  # twice: the bank's enqueue and its second step too
                fn(a, b).backward()
        assert a.grad is not None, name
    with pytest.raises(HostReadError):  # the guard does catch the data checks
        with no_host_reads():
            mk.infonce_loss(z1, z2, validate="full", backend=backend)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_default_path_has_no_cuda_sync(backend):
    z1, z2, calls = _default_calls(backend, "cuda")
    for name, fn in calls.items():
        a, b = (t.clone().requires_grad_() for t in (z1, z2))
        fn(a, b).backward()  # warm-up: lazy initialisation may synchronise once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(a, b).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------
# float32 accuracy against OpenCLIP's own float32 error
# --------------------------------------------------------------------------------------------


def openclip_rows(image, text, scale):
    labels = torch.arange(image.shape[0])
    return torch.cat([F.cross_entropy(scale * image @ text.T, labels, reduction="none"),
                      F.cross_entropy(scale * text @ image.T, labels, reduction="none")])


@pytest.mark.parametrize("backend", [b for b in KERNELS if b in ("torch", "cpu")])
def test_float32_clip_error_no_worse_than_openclip(backend):
    """Per-row float32 error against float64, relative to the row's largest |logit| (no
    cancellation in the measure), worst case over N in {8, 64, 512}, D in {16, 128}, raw
    unnormalised features x1 and x10, scale 1, 14.3 and 100: no worse than OpenCLIP's formula in
    float32 on the same grid (docs/math.md#tolerances)."""
    ours = peer = 0.0
    for n in (8, 64, 512):
        for d in (16, 128):
            for magnitude in (1.0, 10.0):
                g = torch.Generator().manual_seed(n * d)
                image = magnitude * torch.randn(n, d, generator=g, dtype=torch.float64)
                text = image + 0.5 * magnitude * torch.randn(n, d, generator=g,
                                                             dtype=torch.float64)
                for scale in (1.0, 14.3, 100.0):
                    exact = openclip_rows(image, text, scale)
                    row_max = torch.cat([(scale * image @ text.T).abs().amax(1),
                                         (scale * text @ image.T).abs().amax(1)])
                    i32, t32 = image.float(), text.float()
                    got = mk.clip_loss(i32, t32, scale, normalize=False, reduction="none",
                                       backend=backend).double()
                    ours = max(ours, ((got - exact).abs() / row_max).max().item())
                    peer = max(peer, ((openclip_rows(i32, t32, scale).double() - exact).abs()
                                      / row_max).max().item())
    assert ours <= peer, f"ours {ours:.3e} vs OpenCLIP's float32 {peer:.3e}"


@pytest.mark.slow  # a torch.compile (tens of seconds on the CI machine)
def test_moco_loss_compiles_without_graph_break():
    """The bank path (an autograd.Function around the primitive's two custom ops) compiles with
    fullgraph=True and gives the eager loss and gradient."""
    q, k = (t.float() for t in make_pair(8, 16, seed=21))
    bank = F.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(4)), dim=1)

    def step(query):
        return mk.moco_loss(query, k, bank, loss="macl", backend="torch")

    compiled = torch.compile(step, fullgraph=True)
    got = grads_of(compiled, q)
    want = grads_of(step, q)
    assert_same_results(got, want, F32_RTOL, names=("loss", "dq"))
