"""Parity tables of the label / per-sample-temperature losses against the peers' own code.

    PYTHONPATH=.:/path/to/peers python bench/parity_labels.py \
        --supcontrast-file /path/to/SupContrast/losses.py [--backend cpu]

Needs pytorch-metric-learning and libauc importable (e.g. ``pip install --no-deps --target DIR``
and DIR on PYTHONPATH) and SupContrast's ``losses.py`` (a file of its repository, not a
package). Prints, per case, the peer's value, ours, and the relative differences of the loss, of
the input gradients and (GCLoss) of the state after each step:

- SupContrast ``SupConLoss`` vs ``macl_kernels.supcon_loss`` (float64; labels, a mask, SimCLR V=3,
  anchors without positives, one class, contrast_mode "one");
- pytorch-metric-learning ``SupConLoss`` vs ``macl_kernels.SupConLoss`` (float64; incl. ref_emb);
- LibAUC ``GCLoss_v1`` vs ``macl_kernels.GCLoss_v1`` (float64 with the peer's state widened after
  construction, and float32 as is; SogCLR and iSogCLR; 5 steps each).

Exits non-zero when a float64 difference exceeds 1e-9 or a float32 one 1e-6.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys

import torch
import torch.nn.functional as F

import macl_kernels as mk


def rel(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def load_supcontrast(path):
    spec = importlib.util.spec_from_file_location("supcontrast_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SupConLoss


def grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def supcontrast_table(PeerSupCon, backend, rows):
    cases = [
        ("C1 labels", (6, 2, 4, 0), [0, 1, 0, 2, 1, 0], None, (0.07, 0.07, "all")),
        ("C2 no positive", (7, 1, 3, 1), [0, 1, 1, 2, 2, 2, 3], None, (0.1, 0.07, "all")),
        ("C3 mode one", (4, 3, 5, 2), [0, 0, 1, 1], None, (0.1, 0.07, "one")),
        ("C4 SimCLR V=3", (4, 3, 4, 3), None, None, (0.5, 0.5, "all")),
        ("one class", (5, 2, 3, 4), [4, 4, 4, 4, 4], None, (0.3, 0.3, "all")),
        ("mask", (5, 2, 6, 5), None, "mask", (0.2, 0.1, "all")),
        ("N=256 V=2", (256, 2, 32, 6), "rand10", None, (0.1, 0.1, "all")),
    ]
    for name, (bsz, views, d, seed), labels, mask, (T, Tb, mode) in cases:
        g = torch.Generator().manual_seed(seed)
        feats = F.normalize(torch.randn(bsz, views, d, generator=g, dtype=torch.float64), dim=-1)
        if labels == "rand10":
            labels = torch.randint(0, 10, (bsz,), generator=g)
        elif labels is not None:
            labels = torch.tensor(labels)
        if mask == "mask":
            mask = torch.rand(bsz, bsz, generator=g, dtype=torch.float64).round()
        peer = PeerSupCon(temperature=T, contrast_mode=mode, base_temperature=Tb)
        want, (wg,) = grads_of(lambda f: peer(f, labels=labels, mask=mask), feats)
        got, (gg,) = grads_of(lambda f: mk.supcon_loss(f, labels, mask=mask, temperature=T,
                                                       base_temperature=Tb, contrast_mode=mode,
                                                       backend=backend), feats)
        rows.append(("SupContrast", name, "float64", float(want), float(got), rel(got, want),
                     rel(gg, wg)))


def pml_table(backend, rows):
    from pytorch_metric_learning.losses import SupConLoss as PeerPML
    cases = [
        ("C1 rows", 12, 4, 0, [0, 1, 0, 2, 1, 0] * 2, 0.07, None),
        ("C2 no positive", 7, 3, 1, [0, 1, 1, 2, 2, 2, 3], 0.1, None),
        ("one class", 5, 3, 2, [1] * 5, 0.1, None),
        ("N=512", 512, 64, 3, "rand20", 0.1, None),
        ("ref_emb", 6, 4, 4, [0, 1, 2, 0, 1, 2], 0.2, 9),
    ]
    for name, n, d, seed, labels, T, r in cases:
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(n, d, generator=g, dtype=torch.float64)
        labels = (torch.randint(0, 20, (n,), generator=g) if labels == "rand20"
                  else torch.tensor(labels))
        peer, ours = PeerPML(temperature=T), mk.SupConLoss(temperature=T, backend=backend)
        if r is None:
            want, (wg,) = grads_of(lambda e: peer(e, labels), emb)
            got, (gg,) = grads_of(lambda e: ours(e, labels), emb)
        else:
            ref = torch.randn(r, d, generator=g, dtype=torch.float64)
            ref_labels = torch.randint(0, 3, (r,), generator=g)
            want, wg = grads_of(lambda e, q: peer(e, labels, ref_emb=q, ref_labels=ref_labels),
                                emb, ref)
            got, gg = grads_of(lambda e, q: ours(e, labels, ref_emb=q, ref_labels=ref_labels),
                               emb, ref)
            wg, gg = torch.cat([x.flatten() for x in wg]), torch.cat([x.flatten() for x in gg])
        rows.append(("pytorch-metric-learning", name, "float64", float(want), float(got),
                     rel(got, want), rel(gg, wg)))


def libauc_table(backend, rows, steps=5):
    from libauc.losses.contrastive import GCLoss_v1 as PeerGCL
    for iso in (False, True):
        for dtype in (torch.float64, torch.float32):
            kwargs = dict(tau=0.1, gamma=0.9, enable_isogclr=iso)
            with contextlib.redirect_stdout(io.StringIO()):  # the peer prints at construction
                peer = PeerGCL(N=16, device=torch.device("cpu"), **kwargs)
            ours = mk.GCLoss_v1(N=16, backend=backend, state_dtype=dtype, **kwargs)
            if dtype == torch.float64:  # the peer's state is float32: widen it
                peer.u = peer.u.double()
                if iso:
                    peer.learnable_tau = peer.learnable_tau.double()
                    peer.grad_tau = peer.grad_tau.double()
            if iso:  # the peer's tau starts at float32(tau); start ours there too
                ours.learnable_tau.copy_(peer.learnable_tau.to(dtype))
            g = torch.Generator().manual_seed(0)
            worst = [0.0, 0.0, 0.0, 0.0]
            values = []
            for step in range(steps):
                if step == 3:
                    with contextlib.redirect_stdout(io.StringIO()):
                        peer.adjust_gamma(1)
                    ours.adjust_gamma(1)
                idx = torch.randperm(16, generator=g)[:6]
                h = [torch.randn(6, 8, generator=g, dtype=torch.float64).to(dtype)
                     for _ in range(2)]
                want, wg = grads_of(lambda a, b: peer(a, b, idx), *h)
                got, gg = grads_of(lambda a, b: ours(a, b, idx), *h)
                values.append((float(want), float(got)))
                state = [rel(ours.u, peer.u)]
                if iso:
                    state.append(rel(ours.learnable_tau, peer.learnable_tau))
                worst = [max(worst[0], rel(got, want)),
                         max(worst[1], rel(torch.cat([x.flatten() for x in gg]),
                                           torch.cat([x.flatten() for x in wg]))),
                         max(worst[2], state[0]), max(worst[3], state[-1] if iso else 0.0)]
            name = ("iSogCLR" if iso else "SogCLR") + f" {steps} steps"
            rows.append(("LibAUC GCLoss_v1", name, str(dtype).replace("torch.", ""),
                         values[-1][0], values[-1][1], worst[0], worst[1], worst[2], worst[3]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--supcontrast-file", required=True,
                        help="SupContrast's losses.py (HobbitLong/SupContrast)")
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    rows = []
    supcontrast_table(load_supcontrast(args.supcontrast_file), args.backend, rows)
    pml_table(args.backend, rows)
    libauc_table(args.backend, rows)
    print(f"backend={args.backend}, torch {torch.__version__}")
    print("| peer | case | dtype | peer loss | ours | rel. diff loss | rel. diff grads | "
          "rel. diff u | rel. diff tau |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = False
    for row in rows:
        peer, case, dtype, want, got, *diffs = row
        cells = [f"{x:.2e}" for x in diffs] + ["-"] * (4 - len(diffs))
        print(f"| {peer} | {case} | {dtype} | {want:.14g} | {got:.14g} | " + " | ".join(cells)
              + " |")
        bound = 1e-9 if dtype == "float64" else 1e-6
        bad |= any(x > bound for x in diffs)
    if bad:
        print("FAILED: a difference exceeds its bound (float64 1e-9, float32 1e-6)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
