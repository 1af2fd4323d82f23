"""Benchmark two source trees of macl-kernels side by side, in one run (e.g. before and after a
change that must not slow anything down, or that should speed something up).

Each measurement is one fresh worker process of that tree's own benchmark worker, run with the
tree first on ``PYTHONPATH`` (each tree must have its extension built in place, e.g. ``python
setup.py build_ext --inplace``). Which worker a tree has is read from its files
(``TREE_WORKERS``): ``python -m macl_kernels.tools.worker bench`` from issue #24 on, ``python -m
macl_kernels.tools.bench`` at commit 8422e8f, ``python -m macl_kernels._bench`` before it; all
three take the same arguments and print the same JSON line, so trees from either side of the
move compare. The trees alternate within every cell (loss, layout, backend, N, D, dtype) and the
order flips each round, so that machine noise (other processes, thermal state) falls on both
alike.

The roofline: for every (D, dtype) this machine's matmul rate is measured once in a fresh worker
(``macl_kernels/tools/worker.py matmul`` of this script's tree: ``torch.mm`` into a preallocated
output, the whole-matrix shape of the largest N, the same thread count), and every row reports its
useful GFLOP/s (the minimum multiply-adds of a forward+backward step, ``roofline.useful_flops``) and
their fraction of that rate (docs/math.md, roofline section). With ``--paired`` each worker
also times a whole-matrix product before and after every step in its own process and the table
adds "paired of matmul", the median per-step fraction against those neighbouring products, which
a drifting machine rate does not skew (``paired_worker``; docs/math.md, "Paired fractions").

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
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
_roofline = None  # this tree's macl_kernels.tools.roofline, imported by the parent only (main)
_worker = None  # this tree's macl_kernels.tools.worker (the matmul rate), likewise

# The benchmark worker of a tree, newest first: (the file that marks it, its module, the arguments
# before the measurement's). Every one of them has ``measure``, ``make_inputs`` and ``make_step``
# with the same signatures (the paired worker calls them).
TREE_WORKERS: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("macl_kernels/tools/worker.py", "macl_kernels.tools.worker", ("bench",)),  # issue #24 on
    ("macl_kernels/tools/bench.py", "macl_kernels.tools.bench", ()),  # commit 8422e8f
    ("macl_kernels/_bench.py", "macl_kernels._bench", ()),  # before the three wings
)

DEFAULT_CASES = "macl:2n,clip:cross_sym"


def _csv_list(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def tree_worker(tree: str) -> Tuple[str, Tuple[str, ...]]:
    """The benchmark worker module of ``tree`` and the arguments that select its measurement
    (``TREE_WORKERS``); ``ValueError`` for a tree with none of them."""
    for marker, module, prefix in TREE_WORKERS:
        if os.path.isfile(os.path.join(tree, marker)):
            return module, prefix
    raise ValueError(f"tree {tree!r}: no benchmark worker found (looked for "
                     f"{', '.join(marker for marker, _, _ in TREE_WORKERS)})")


def run_worker(tree: str, loss: str, layout: str, backend: str, n: int, dim: int, dtype: str,
               args) -> Dict:
    module, prefix = tree_worker(tree)
    cmd = [sys.executable, "-m", module, *prefix, "--loss", loss, "--layout", layout,
           "--backend", backend, "--n", str(n), "--dim", str(dim), "--dtype", dtype,
           "--device", "cpu", "--repeats", str(args.repeats), "--seed", "0"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return _json_worker(cmd, tree, args.timeout)


def _json_worker(cmd: List[str], tree: str, timeout: float) -> Dict:
    """Run ``cmd`` in ``tree`` with the tree first on ``PYTHONPATH``; its last JSON line."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=os.path.abspath(tree), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def run_paired_worker(tree: str, loss: str, layout: str, backend: str, n: int, dim: int,
                      dtype: str, args) -> Dict:
    """One fresh worker of ``tree`` that runs the tree's own benchmark measurement (its worker
    module's ``measure``: peak memory and step times) and then the paired loop
    (``paired_worker``, this script run with the tree on ``PYTHONPATH``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--paired-worker",
           json.dumps(dict(module=tree_worker(tree)[0], loss=loss, layout=layout,
                           backend=backend, n=n, dim=dim, dtype=dtype,
                           repeats=args.repeats, threads=args.threads,
                           matmul_side=_whole_matrix_side(layout, n, dim),
                           warmup_s=_roofline.WARMUP_S))]
    return _json_worker(cmd, tree, args.timeout)


def _whole_matrix_side(layout: str, n: int, dim: int) -> int:
    """Side of the whole-matrix product of ``_roofline`` (``S``'s side, capped)."""
    return _roofline.matmul_shapes(layout, n, dim)[1][0]


def paired_worker(spec: Dict) -> Dict:
    """Worker side of ``--paired``: the machine's matmul rate measured next to every step.

    On a shared machine the matmul rate itself drifts by tens of per cent within minutes (on the
    2-core development VM: 76 to 127 GFLOP/s for ``4096 x 128 @ 128 x 4096`` in consecutive
    runs), so a fraction taken against a rate measured once, minutes apart, carries that drift.
    Here each timed step sits between two timed whole-matrix products (``torch.mm`` into a
    preallocated output, the shape and dtype of ``_roofline``'s whole-matrix rate) in the same
    process and threads; the step's fraction is its useful rate over the faster of the two
    products' rates (the conservative choice: a momentarily slow product must not flatter the
    step), and the worker reports every pair. The tree's own ``measure`` (``spec["module"]``, its
    worker module) runs first, so its time and memory columns are the tree's usual ones."""
    import importlib

    import torch

    tree = importlib.import_module(spec["module"])  # the tree under test (PYTHONPATH)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = tree.measure(spec["loss"], spec["layout"], spec["backend"], spec["n"],
                            spec["dim"], spec["dtype"], "cpu", spec["repeats"], 0)
    torch_dtype = getattr(torch, spec["dtype"])
    p = spec["matmul_side"]  # computed by the parent with _roofline (this tree's)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(p, spec["dim"], generator=gen).to(torch_dtype)
    bt = torch.randn(p, spec["dim"], generator=gen).to(torch_dtype).t()
    out = torch.empty(p, p, dtype=torch_dtype)
    z1, z2 = tree.make_inputs(spec["n"], spec["dim"], torch_dtype, torch.device("cpu"), 0)
    step = tree.make_step(spec["loss"], spec["layout"], spec["backend"], z1, z2)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def product() -> None:
        torch.mm(a, bt, out=out)

    step()
    t_end = time.perf_counter() + spec["warmup_s"]  # untimed products: _roofline.WARMUP_S
    while time.perf_counter() < t_end:
        product()
    before = timed(product)
    steps, products = [], []
    for _ in range(spec["repeats"]):
        t_step = timed(step)
        after = timed(product)
        steps.append(t_step)
        products.append(min(before, after))
        before = after
    result.update(paired_step_s=steps, paired_matmul_s=products,
                  paired_matmul_shape=f"{p}x{spec['dim']} @ {spec['dim']}x{p}")
    return result


def paired_fraction(layout: str, n: int, dim: int, res: Dict) -> Optional[float]:
    """Median over a paired worker's steps of (useful GFLOP/s of the step) / (matmul GFLOP/s of
    its neighbouring product)."""
    steps, products = res.get("paired_step_s"), res.get("paired_matmul_s")
    if not steps or not products:
        return None
    p = _whole_matrix_side(layout, n, dim)
    mm_flops = 2.0 * p * p * dim
    useful = _roofline.useful_flops(layout, n, dim)
    return statistics.median((useful / t) / (mm_flops / m) for t, m in zip(steps, products))


def matmul_rate(layout: str, n_max: int, dim: int, dtype: str, threads) -> Dict:
    """This machine's matmul rate in a fresh worker (this tree's ``worker.py matmul``)."""
    options = ["--layout", layout, "--n-max", str(n_max), "--dim", str(dim), "--dtype", dtype]
    if threads:
        options += ["--threads", str(threads)]
    cmd = _worker.command("matmul", options)
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
    if len(sys.argv) == 3 and sys.argv[1] == "--paired-worker":
        try:
            print(json.dumps(paired_worker(json.loads(sys.argv[2]))), flush=True)
        except Exception as exc:  # reported as data, like the benchmark workers
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            return 1
        return 0
    global _roofline, _worker
    sys.path.insert(0, os.path.dirname(HERE))  # this tree's macl_kernels.tools
    from macl_kernels.tools import roofline as _roofline, worker as _worker

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
    p.add_argument("--paired", action="store_true",
                   help="also time a whole-matrix matmul next to every step in each worker and "
                        "report the median per-step fraction ('paired of matmul'; see "
                        "paired_worker)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    trees: List[Tuple[str, str]] = [tuple(t.split("=", 1)) for t in args.tree]
    for label, tree in trees:
        try:
            tree_worker(tree)  # before any measurement: a tree without a worker is a usage error
        except ValueError as exc:
            p.error(str(exc))
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
                                worker = run_paired_worker if args.paired else run_worker
                                res = worker(tree, loss, layout, backend, n, dim, dtype, args)
                                rows.append(dict(
                                    tree=label, loss=loss, layout=layout, backend=backend, N=n,
                                    D=dim, dtype=dtype, round=r, ok=res.get("ok"),
                                    median_s=res.get("median_s"),
                                    peak_extra_bytes=res.get("peak_extra_bytes"),
                                    paired_fraction=paired_fraction(layout, n, dim, res),
                                    paired_step_s=res.get("paired_step_s"),
                                    paired_matmul_s=res.get("paired_matmul_s"),
                                    error=res.get("error", "")))
                                print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    header = (["loss", "layout", "backend", "N", "D", "dtype"]
              + [f"{lb} ms" for lb in labels] + [f"{lb} GFLOP/s" for lb in labels]
              + [f"{lb} of matmul" for lb in labels]
              + ([f"{lb} paired of matmul" for lb in labels] if args.paired else [])
              + [f"{lb} MiB" for lb in labels]
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
                        paired = {lb: _median(x["paired_fraction"] for x in cell[lb])
                                  for lb in labels}
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
                            + ([_fmt(paired[lb], ".2f") for lb in labels] if args.paired else [])
                            + [_fmt(mib[lb] and mib[lb] / 2**20, ".0f") for lb in labels]
                            + [_fmt(ratio, ".2f")]) + " |")
    summary = (f"forward+backward, {args.rounds} workers x {args.repeats} steps per cell, "
               f"threads {args.threads or 'default'}; "
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. "
               f"'of matmul': useful GFLOP/s over the matmul rate of rates.json."
               + (" 'paired of matmul': per worker the median over its steps of the step's "
                  "useful GFLOP/s over the rate of the faster of the two whole-matrix products "
                  "timed around it in the same process; the median over the workers."
                  if args.paired else ""))
    table = "\n".join([summary, ""] + lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
