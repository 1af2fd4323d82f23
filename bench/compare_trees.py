"""Benchmark two source trees of macl-kernels side by side, in one run (e.g. before and after a
refactor that must not slow anything down).

Each measurement is one fresh worker process of that tree's own benchmark worker
(``python -m macl_kernels._bench``, run with the tree first on ``PYTHONPATH``; each tree must have
its extension built in place, e.g. ``python setup.py build_ext --inplace``). The trees alternate
within every (loss, backend) and the order flips each round, so that machine noise (other
processes, thermal state) falls on both alike.

    python bench/compare_trees.py --tree before=/tmp/before --tree after=. \\
        --n 4096 --dim 128 --rounds 3 --out bench/results/redesign_before_after

Writes OUT/compare.csv (one row per worker run) and prints the median of each tree's medians and
the ratio of the last tree to the first.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Dict, List, Tuple

CASES = (("macl", "2n"), ("clip", "cross_sym"))


def run_worker(tree: str, loss: str, layout: str, backend: str, args) -> Dict:
    cmd = [sys.executable, "-m", "macl_kernels._bench", "--loss", loss, "--layout", layout,
           "--backend", backend, "--n", str(args.n), "--dim", str(args.dim), "--dtype",
           args.dtype, "--device", "cpu", "--repeats", str(args.repeats), "--seed", "0"]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.abspath(tree),
                          timeout=args.timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="LABEL=PATH (two or more)")
    p.add_argument("--backends", default="reference,torch,cpu")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per worker")
    p.add_argument("--rounds", type=int, default=3, help="workers per (tree, loss, backend)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    trees: List[Tuple[str, str]] = [tuple(t.split("=", 1)) for t in args.tree]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for loss, layout in CASES:
        for backend in backends:
            for r in range(args.rounds):
                order = trees if r % 2 == 0 else trees[::-1]
                for label, tree in order:
                    res = run_worker(tree, loss, layout, backend, args)
                    rows.append(dict(tree=label, loss=loss, layout=layout, backend=backend,
                                     round=r, ok=res.get("ok"), median_s=res.get("median_s"),
                                     peak_extra_bytes=res.get("peak_extra_bytes"),
                                     error=res.get("error", "")))
                    print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    labels = [label for label, _ in trees]
    print(f"\nN={args.n}, D={args.dim}, {args.dtype}, forward+backward, {args.rounds} workers x "
          f"{args.repeats} steps per cell; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    header = ["loss", "layout", "backend"] + [f"{lb} ms" for lb in labels] + \
        [f"{lb} MiB" for lb in labels] + [f"{labels[-1]}/{labels[0]}"]
    print(" | ".join(header))
    for loss, layout in CASES:
        for backend in backends:
            cell = {lb: [x for x in rows if x["tree"] == lb and x["loss"] == loss
                         and x["backend"] == backend and x["ok"]] for lb in labels}
            ms = {lb: statistics.median(x["median_s"] for x in cell[lb]) * 1e3 if cell[lb]
                  else float("nan") for lb in labels}
            mib = {lb: statistics.median(x["peak_extra_bytes"] for x in cell[lb]) / 2**20
                   if cell[lb] else float("nan") for lb in labels}
            print(" | ".join([loss, layout, backend] + [f"{ms[lb]:.0f}" for lb in labels]
                             + [f"{mib[lb]:.0f}" for lb in labels]
                             + [f"{ms[labels[-1]] / ms[labels[0]]:.2f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
