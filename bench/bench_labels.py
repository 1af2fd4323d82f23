"""Forward+backward time and peak extra memory of the label / per-sample-temperature losses
against the peers, side by side in one run, each measurement in a fresh subprocess (CPU peak
memory is the process's peak RSS growth over the inputs, so it belongs to that measurement
alone). Not a test: nothing asserts a time.

    PYTHONPATH=.:/path/to/peers python bench/bench_labels.py \
        --supcontrast-file /path/to/SupContrast/losses.py [--n 4096] [--dim 128] [--backend cpu]

``--n`` is the samples per view (2 views: ``2n`` rows), float32, random labels of
``--classes`` classes. Contestants (a missing peer is reported and skipped):

- SupCon: pytorch-metric-learning ``SupConLoss`` (rows ``[2n, D]``, repeated labels),
  SupContrast ``SupConLoss`` (``[n, 2, D]``), ``macl_kernels.supcon_loss`` (``[n, 2, D]``) and
  the drop-in ``macl_kernels.SupConLoss`` (``[2n, D]``), on ``--backend``;
- SogCLR / iSogCLR: LibAUC ``GCLoss_v1`` and ``macl_kernels.GCLoss_v1`` (data set of ``4 n``).

Prints a markdown table (median seconds of ``--repeats`` fwd+bwd after a warm-up, peak extra MiB,
and the ratios against the first peer of each group) and the device.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

CONTESTANTS = [
    ("supcon", "pytorch-metric-learning SupConLoss"),
    ("supcon", "SupContrast SupConLoss"),
    ("supcon", "macl_kernels.supcon_loss"),
    ("supcon", "macl_kernels.SupConLoss"),
    ("gcl", "LibAUC GCLoss_v1"),
    ("gcl", "macl_kernels.GCLoss_v1"),
    ("gcl", "LibAUC GCLoss_v1 iSogCLR"),
    ("gcl", "macl_kernels.GCLoss_v1 iSogCLR"),
]


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(spec):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    name, n, d, classes, repeats, backend = (spec[k] for k in (
        "name", "n", "dim", "classes", "repeats", "backend"))
    feats = F.normalize(torch.randn(n, 2, d), dim=-1).requires_grad_(True)
    labels = torch.randint(0, classes, (n,))
    rows = torch.randn(2 * n, d, requires_grad=True)
    rows_labels = labels.repeat(2)
    h1 = torch.randn(n, d, requires_grad=True)
    h2 = torch.randn(n, d, requires_grad=True)
    index = torch.randperm(4 * n)[:n]
    if name.startswith("pytorch-metric-learning"):
        from pytorch_metric_learning.losses import SupConLoss
        loss_fn = SupConLoss(temperature=0.1)
        step = lambda: loss_fn(rows, rows_labels)  # noqa: E731
    elif name.startswith("SupContrast"):
        source = importlib.util.spec_from_file_location("supcontrast_losses",
                                                        spec["supcontrast_file"])
        module = importlib.util.module_from_spec(source)
        source.loader.exec_module(module)
        loss_fn = module.SupConLoss(temperature=0.1, base_temperature=0.1)
        step = lambda: loss_fn(feats, labels=labels)  # noqa: E731
    elif name == "macl_kernels.supcon_loss":
        import macl_kernels as mk
        step = lambda: mk.supcon_loss(feats, labels, temperature=0.1, base_temperature=0.1,  # noqa: E731,E501
                                      backend=backend, validate=False)
    elif name == "macl_kernels.SupConLoss":
        import macl_kernels as mk
        loss_fn = mk.SupConLoss(temperature=0.1, backend=backend, validate=False)
        step = lambda: loss_fn(rows, rows_labels)  # noqa: E731
    elif name.startswith("LibAUC"):
        from libauc.losses.contrastive import GCLoss_v1
        with contextlib.redirect_stdout(io.StringIO()):
            loss_fn = GCLoss_v1(N=4 * n, device=torch.device("cpu"),
                                enable_isogclr=name.endswith("iSogCLR"))
        step = lambda: loss_fn(h1, h2, index)  # noqa: E731
    else:
        import macl_kernels as mk
        loss_fn = mk.GCLoss_v1(N=4 * n, enable_isogclr=name.endswith("iSogCLR"),
                               backend=backend, validate=False)
        step = lambda: loss_fn(h1, h2, index)  # noqa: E731
    base = _peak_mib()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        step().backward()
        if i:
            times.append(time.perf_counter() - t0)
        for t in (feats, rows, h1, h2):
            t.grad = None
    return dict(name=name, seconds=statistics.median(times), peak_extra_mib=_peak_mib() - base,
                threads=torch.get_num_threads())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="samples per view")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--supcontrast-file", default=None)
    parser.add_argument("--only", default=None, help="comma-separated groups: supcon,gcl")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    groups = None if args.only is None else set(args.only.split(","))
    results = []
    for group, name in CONTESTANTS:
        if groups is not None and group not in groups:
            continue
        if name.startswith("SupContrast") and not args.supcontrast_file:
            results.append((group, name, None, "no --supcontrast-file"))
            continue
        spec = dict(name=name, n=args.n, dim=args.dim, classes=args.classes,
                    repeats=args.repeats, backend=args.backend,
                    supcontrast_file=args.supcontrast_file)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                               json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            results.append((group, name, None, proc.stderr.strip().splitlines()[-1][:120]))
        else:
            results.append((group, name, json.loads(proc.stdout.strip().splitlines()[-1]), None))
    print(f"n = {args.n} per view (2 views), D = {args.dim}, float32, {args.classes} classes, "
          f"backend {args.backend!r}, CPU {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("| group | contestant | fwd+bwd s | peak extra MiB | speed-up vs first | memory ratio |")
    print("|---|---|---|---|---|---|")
    first = {}
    for group, name, res, error in results:
        if res is None:
            print(f"| {group} | {name} | - | - | - | {error} |")
            continue
        ref = first.setdefault(group, res)
        speed = ref["seconds"] / res["seconds"]
        memory = res["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9)
        print(f"| {group} | {name} | {res['seconds']:.3f} | {res['peak_extra_mib']:.1f} | "
              f"{speed:.1f}x | {memory:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
