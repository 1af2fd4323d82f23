"""Pool the worker rows of several `bench/compare_trees.py` runs (their `compare.csv`) of two trees.

Per cell (loss, layout, backend, N, D, dtype): the workers of every run, the median step time per
tree and their ratio, the median of the per-round ratios (the two trees' workers of one round ran
back to back), and the ratio of the trees' median paired fractions (the step's useful rate over the
matmul rate timed next to it in the same worker: machine-speed drift cancels; docs/math.md,
"Paired fractions"). A ratio above 1 means the second tree is slower.

    python bench/pool_compare.py --trees before,after run1/compare.csv run2/compare.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+")
    p.add_argument("--trees", default="before,after", help="FIRST,SECOND: the labels to compare")
    args = p.parse_args(argv)
    first, second = args.trees.split(",")
    rounds = defaultdict(dict)  # (cell, run, round) -> tree -> row
    for run, path in enumerate(args.csv):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["ok"] != "True":
                    continue
                cell = tuple(row[k] for k in ("loss", "layout", "backend", "N", "D", "dtype"))
                rounds[(cell, run, row["round"])][row["tree"]] = row
    cells = defaultdict(list)
    for (cell, _, _), trees in rounds.items():
        if first in trees and second in trees:
            cells[cell].append(trees)
    print(f"| loss | layout | backend | N | D | dtype | rounds | {first} ms | {second} ms | "
          f"ratio of medians | median of per-round ratios | paired fraction {first} / {second} | "
          f"{first}/{second} of paired fractions |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for cell, pairs in cells.items():
        t = {k: statistics.median(float(r[k]["median_s"]) for r in pairs) for k in (first, second)}
        per_round = statistics.median(float(r[second]["median_s"]) / float(r[first]["median_s"])
                                      for r in pairs)
        pf = {k: statistics.median(float(r[k]["paired_fraction"]) for r in pairs)
              for k in (first, second)}
        print(f"| {' | '.join(cell)} | {len(pairs)} | {1000 * t[first]:.0f} | {1000 * t[second]:.0f} "
              f"| {t[second] / t[first]:.3f} | {per_round:.3f} | {pf[first]:.3f} / {pf[second]:.3f} "
              f"| {pf[first] / pf[second]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
