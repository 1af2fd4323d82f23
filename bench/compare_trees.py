"""Benchmark two source trees of macl-kernels side by side, in one run (e.g. before and after a
change that must not slow anything down, or that should speed something up).

Each measurement is one fresh worker process of that tree's own benchmark worker
(``python -m macl_kernels._bench``, run with the tree first on ``PYTHONPATH``; each tree must have
its extension built in place, e.g. ``python setup.py build_ext --inplace``). The trees alternate
within every cell (loss, layout, backend, N, D, dtype) and the order flips each round, so that
machine noise (other processes, thermal state) falls on both alike.

The roofline: for every (D, dtype) this machine's matmul rate is measured once in a fresh worker
(``macl_kernels/_roofline.py`` of this script's tree: ``torch.mm`` into a preallocated output, the
whole-matrix shape of the largest N, the same thread count), and every row reports its useful
GFLOP/s (the minimum multiply-adds of a forward+backward step, ``_roofline.useful_flops``) and
their fraction of that rate (docs/math.md, roofline section).

    python bench/compare_trees.py --tree before=/tmp/before --tree after=. \\
        --cases macl:2n,infonce:cross,clip:cross_sym --backends cpu \\
        --n 2048,4096,8192 --dim 128,512 --dtype float32,bfloat16 --threads 2 \\
        --rounds 3 --out bench/results/<name>

Writes OUT/compare.csv (one row per worker run), OUT/rates.json (the matmul rates) and
OUT/table.md (per cell: each tree's median of its workers' medians, useful GFLOP/s, fraction of
the matmul rate, peak extra memory, and the ratio of the last tree's time to the first's), and
prints the table.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this tree's macl_kernels._roofline (torch only)

from macl_kernels import _roofline  # noqa: E402

DEFAULT_CASES = "macl:2n,clip:cross_sym"


def _csv_list(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def run_worker(tree: str, loss: str, layout: str, backend: str, n: int, dim: int, dtype: str,
               args) -> Dict:
    cmd = [sys.executable, "-m", "macl_kernels._bench", "--loss", loss, "--layout", layout,
           "--backend", backend, "--n", str(n), "--dim", str(dim), "--dtype", dtype,
           "--device", "cpu", "--repeats", str(args.repeats), "--seed", "0"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=os.path.abspath(tree), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def matmul_rate(layout: str, n_max: int, dim: int, dtype: str, threads) -> Dict:
    """This machine's matmul rate in a fresh worker (``_roofline.py`` run as a script)."""
    cmd = [sys.executable, os.path.abspath(_roofline.__file__), "--layout", layout,
           "--n-max", str(n_max), "--dim", str(dim), "--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, help="LABEL=PATH (two or more)")
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help=f"comma-separated LOSS:LAYOUT (default {DEFAULT_CASES})")
    p.add_argument("--backends", default="reference,torch,cpu")
    p.add_argument("--n", default="4096", help="rows per view, comma-separated")
    p.add_argument("--dim", default="128", help="embedding widths D, comma-separated")
    p.add_argument("--dtype", default="float32", help="input dtypes, comma-separated")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every worker (default torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per worker")
    p.add_argument("--rounds", type=int, default=3, help="workers per (tree, cell)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    trees: List[Tuple[str, str]] = [tuple(t.split("=", 1)) for t in args.tree]
    labels = [label for label, _ in trees]
    cases = [tuple(c.split(":", 1)) for c in _csv_list(args.cases)]
    backends = _csv_list(args.backends)
    sizes, dims, dtypes = _csv_list(args.n, int), _csv_list(args.dim, int), _csv_list(args.dtype)
    os.makedirs(args.out, exist_ok=True)

    # The matmul rate per (D, dtype): the whole-matrix shape of the largest N (layout cross:
    # S is N x N, capped at 4096 a side by _roofline).
    rates = {}
    for dim in dims:
        for dtype in dtypes:
            rates[f"{dim}/{dtype}"] = r = matmul_rate("cross", max(sizes), dim, dtype,
                                                       args.threads)
            print(_roofline.describe_rates(r), flush=True)
    with open(os.path.join(args.out, "rates.json"), "w") as f:
        json.dump(rates, f, indent=1)

    rows = []
    for loss, layout in cases:
        for backend in backends:
            for dim in dims:
                for dtype in dtypes:
                    for n in sizes:
                        for r in range(args.rounds):
                            order = trees if r % 2 == 0 else trees[::-1]
                            for label, tree in order:
                                res = run_worker(tree, loss, layout, backend, n, dim, dtype, args)
                                rows.append(dict(
                                    tree=label, loss=loss, layout=layout, backend=backend, N=n,
                                    D=dim, dtype=dtype, round=r, ok=res.get("ok"),
                                    median_s=res.get("median_s"),
                                    peak_extra_bytes=res.get("peak_extra_bytes"),
                                    error=res.get("error", "")))
                                print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    header = (["loss", "layout", "backend", "N", "D", "dtype"]
              + [f"{lb} ms" for lb in labels] + [f"{lb} GFLOP/s" for lb in labels]
              + [f"{lb} of matmul" for lb in labels] + [f"{lb} MiB" for lb in labels]
              + [f"{labels[-1]}/{labels[0]}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for loss, layout in cases:
        for backend in backends:
            for dim in dims:
                for dtype in dtypes:
                    rate = rates[f"{dim}/{dtype}"].get("matmul_gflops")
                    for n in sizes:
                        cell = {lb: [x for x in rows if x["tree"] == lb and x["loss"] == loss
                                     and x["layout"] == layout and x["backend"] == backend
                                     and x["N"] == n and x["D"] == dim and x["dtype"] == dtype
                                     and x["ok"]] for lb in labels}
                        sec = {lb: _median(x["median_s"] for x in cell[lb]) for lb in labels}
                        mib = {lb: _median(x["peak_extra_bytes"] for x in cell[lb])
                               for lb in labels}
                        flops = _roofline.useful_flops(layout, n, dim)
                        gfs = {lb: flops / sec[lb] / 1e9 if sec[lb] else None for lb in labels}
                        ratio = (sec[labels[-1]] / sec[labels[0]]
                                 if sec[labels[-1]] and sec[labels[0]] else None)
                        lines.append("| " + " | ".join(
                            [loss, layout, backend, str(n), str(dim), dtype]
                            + [_fmt(sec[lb] and sec[lb] * 1e3, ".0f") for lb in labels]
                            + [_fmt(gfs[lb], ".1f") for lb in labels]
                            + [_fmt(_roofline.fraction(gfs[lb], rate), ".2f") for lb in labels]
                            + [_fmt(mib[lb] and mib[lb] / 2**20, ".0f") for lb in labels]
                            + [_fmt(ratio, ".2f")]) + " |")
    summary = (f"forward+backward, {args.rounds} workers x {args.repeats} steps per cell, "
               f"threads {args.threads or 'default'}; "
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. "
               f"'of matmul': useful GFLOP/s over the matmul rate of rates.json.")
    table = "\n".join([summary, ""] + lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
