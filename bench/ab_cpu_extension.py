"""Two builds of the C++ extension side by side in ONE process, on the same library code.

`bench/compare_trees.py` compares whole trees, each in fresh worker processes with its own worker
and library; on a shared 2-core machine its per-cell medians move by 5-10 % between runs. For a
change of the C++ kernels alone this script isolates them: it loads each tree's
`macl_kernels/_C_cpu*.so` from its file (two distinct modules in one process), installs one at a
time as the `cpu` backend's extension of the library under test (this script's tree, or
`--library`), and alternates the two on the same leaves, step by step (the order flips every
round). It reports each build's median step time, the ratio of the medians, the median of the
per-round ratios, and whether the two builds' loss and gradient are bitwise equal.

    python bench/ab_cpu_extension.py --build before=/tmp/before --build after=. --loss clip

Both builds must take the arguments the library passes (the binding's argument order).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def load_extension(tree: str):
    paths = glob.glob(os.path.join(tree, "macl_kernels", "_C_cpu*.so"))
    if len(paths) != 1:
        raise SystemExit(f"--build {tree}: expected one macl_kernels/_C_cpu*.so (build it in place: "
                         f"python setup.py build_ext --inplace), found {paths}")
    spec = importlib.util.spec_from_file_location("macl_kernels._C_cpu", paths[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="append", required=True, help="LABEL=TREE (exactly two)")
    p.add_argument("--library", default=os.path.dirname(HERE),
                   help="the tree whose library runs both builds (default: this one)")
    p.add_argument("--loss", choices=("clip", "macl", "infonce"), default="clip")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    if len(args.build) != 2 or any("=" not in b for b in args.build):
        p.error("--build: give exactly two LABEL=TREE")
    sys.path.insert(0, args.library)
    import torch

    import macl_kernels as mk
    from macl_kernels.primitive.backends import cpu as CPU

    builds = {label: load_extension(tree) for label, tree in (b.split("=", 1) for b in args.build)}
    torch.manual_seed(0)
    z1 = torch.randn(args.n, args.dim, requires_grad=True)
    z2 = torch.randn(args.n, args.dim, requires_grad=True)
    scale = torch.tensor(100.0, requires_grad=True)

    def step():
        for leaf in (z1, z2, scale):
            leaf.grad = None
        if args.loss == "clip":
            loss = mk.clip_loss(z1, z2, scale, backend="cpu", validate=False)
        elif args.loss == "macl":
            loss = mk.macl_loss(z1, z2, backend="cpu", validate=False)
        else:
            loss = mk.infonce_loss(z1, z2, layout="cross", backend="cpu", validate=False)
        loss.backward()
        return loss.detach(), z1.grad.clone()

    labels = list(builds)
    times = {label: [] for label in labels}
    results = {}
    for r in range(args.rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            CPU._EXTENSION._module = builds[label]  # this build serves the next calls
            step()  # warm-up (allocator, thread pool) for this build
            t0 = time.perf_counter()
            results[label] = step()
            times[label].append(time.perf_counter() - t0)
    a, b = labels
    ratios = [x / y for x, y in zip(times[b], times[a])]
    for label in labels:
        print(f"{label}: median {1000 * statistics.median(times[label]):.1f} ms over {args.rounds} steps")
    print(f"{b}/{a}: ratio of medians {statistics.median(times[b]) / statistics.median(times[a]):.3f}, "
          f"median of per-round ratios {statistics.median(ratios):.3f}")
    same = all(torch.equal(x, y) for x, y in zip(results[a], results[b]))
    print(f"loss and d z1 bitwise equal: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
