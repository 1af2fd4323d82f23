"""Plot pytest-benchmark results of ``bench/bench_micro.py``: time against N, one line per backend.

    python -m pytest bench/bench_micro.py --benchmark-json=micro.json
    python bench/plot_micro.py micro.json --out micro.png [--csv micro.csv]

One panel per benchmark group (loss, layout, D, dtype, device), x = N (rows per view, log 2),
y = median time of a forward+backward (log), error bars from the fastest to the slowest round.
The parameters are read from each benchmark's ``extra_info`` (written by ``bench_micro.py``),
falling back to its ``params`` (``backend``, ``n``, ``loss``, ``layout``). Several JSON files
(e.g. one per machine) are merged; their machine names are appended to the backend labels when
they differ.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

CSV_COLUMNS = ("source", "machine", "group", "loss", "layout", "backend", "N", "D", "dtype",
               "device", "rounds", "min_s", "median_s", "mean_s", "max_s", "stddev_s")


def load(paths: Sequence[str]) -> List[Dict]:
    """One flat record per benchmark of every file."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        machine = data.get("machine_info", {}).get("node") or os.path.basename(path)
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("params") or {})
            info.update(bench.get("extra_info") or {})
            stats = bench.get("stats") or {}
            n = info.get("N", info.get("n"))
            if n is None or "median" not in stats:
                continue  # not one of ours, or run with --benchmark-disable
            records.append({
                "source": path, "machine": machine,
                "group": bench.get("group") or f"{info.get('loss')} {info.get('layout')}",
                "loss": info.get("loss"), "layout": info.get("layout"),
                "backend": info.get("backend", "?"), "N": int(n), "D": info.get("D"),
                "dtype": info.get("dtype"), "device": info.get("device"),
                "rounds": stats.get("rounds"), "min_s": stats.get("min"),
                "median_s": stats["median"], "mean_s": stats.get("mean"),
                "max_s": stats.get("max"), "stddev_s": stats.get("stddev"),
            })
    return records


def write_csv(path: str, records: Sequence[Dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS})


def plot(path: str, records: Sequence[Dict], title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[str, List[Dict]] = defaultdict(list)
    for r in records:
        groups[r["group"]].append(r)
    multi_machine = len({r["machine"] for r in records}) > 1
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (group, rows) in zip(axes.flat, sorted(groups.items())):
        lines: Dict[str, List[Dict]] = defaultdict(list)
        for r in rows:
            label = r["backend"] + (f" ({r['machine']})" if multi_machine else "")
            lines[label].append(r)
        for label, pts in sorted(lines.items()):
            pts.sort(key=lambda r: r["N"])
            ns = [r["N"] for r in pts]
            med = [1e3 * r["median_s"] for r in pts]
            lo = [1e3 * (r["median_s"] - (r["min_s"] if r["min_s"] is not None else r["median_s"]))
                  for r in pts]
            hi = [1e3 * ((r["max_s"] if r["max_s"] is not None else r["median_s"]) - r["median_s"])
                  for r in pts]
            ax.errorbar(ns, med, yerr=[lo, hi], fmt="o-", capsize=3, label=label)
        ns_all = sorted({r["N"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ns_all)
        ax.set_xticklabels([str(n) for n in ns_all])
        ax.set_xlabel("N (rows per view)")
        ax.set_ylabel("forward+backward, median ms")
        ax.set_title(group, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Plot time vs N per backend from pytest-benchmark "
                                            "JSON (--benchmark-json) of bench/bench_micro.py.")
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    p.add_argument("--out", default="micro.png", help="PNG to write (default micro.png)")
    p.add_argument("--csv", default=None, help="also write the flat table as CSV")
    p.add_argument("--title", default=None, help="figure title")
    args = p.parse_args(argv)
    records = load(args.json)
    if not records:
        print("plot_micro: no timed benchmarks in " + ", ".join(args.json)
              + " (was it run with --benchmark-disable?)", file=sys.stderr)
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    plot(args.out, records, args.title)
    if args.csv:
        write_csv(args.csv, records)
    groups = sorted({r["group"] for r in records})
    print(f"plot_micro: {len(records)} benchmarks in {len(groups)} group(s) -> {args.out}"
          + (f", {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
