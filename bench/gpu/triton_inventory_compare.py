"""Before/after summary of the Triton kernel inventories in
bench/results/gpu_sm90_compiled_resources/ (the tables of its README.md; that folder is the
default).

    python bench/gpu/triton_inventory_compare.py bench/results/gpu_sm90_compiled_resources

Per Triton version, precision and D (D = 768 runs at BLOCK_D = 1024): the worst spill and shared
memory over the configurations that could be launched - before: the old default shape; after:
the default shape and every autotune candidate of the shape table - or "refused" where the
backend now refuses the width. Also prints, per shape-table entry, the most shared memory
measured over both versions (what ``_SHAPES`` records).
"""

import csv
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
folder = (sys.argv[1] if len(sys.argv) > 1
          else os.path.join(ROOT, "bench", "results", "gpu_sm90_compiled_resources"))


def load(pattern):
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, pattern))):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


before, after = load("before_triton*.csv"), load("after_triton*.csv")
versions = sorted({r["triton"] for r in before + after}, reverse=True)


def worst(rows, count):
    run = [r for r in rows if r["role"] != "refused" and r.get("spill_bytes")]
    if not run:
        return "refused" if rows else ""
    return (f"{max(int(r['spill_bytes']) for r in run)} / "
            f"{max(int(r['shared_bytes']) for r in run)}" + (f" ({len(run)})" if count else ""))


print("| precision | D | " + " | ".join(f"before {v} | after {v}" for v in versions) + " |")
print("|---|---:|" + "---|---|" * len(versions))
for precision in ("fp32", "fp32-tf32", "bf16", "fp16", "fp64"):
    for d, block_d in ((128, 128), (256, 256), (512, 512), (768, 1024), (1024, 1024)):
        cells = []
        for version in versions:
            def pick(rows):
                return [r for r in rows if r["triton"] == version
                        and r["precision"] == precision and int(r["block_d"]) == block_d]
            cells += [worst(pick(before), False), worst(pick(after), True)]
        print(f"| {precision} | {d} | " + " | ".join(cells) + " |")

print()
print("shared memory per shape-table entry, most over versions and flag sets:")
most = {}
for r in after:
    if r["role"] == "refused" or not r.get("shared_bytes"):
        continue
    key = (r["precision"], r["kernel"], int(r["block_d"]),
           (int(r["block_m"]), int(r["block_n"]), int(r["num_warps"]), int(r["num_stages"])))
    most[key] = max(most.get(key, 0), int(r["shared_bytes"]))
for key in sorted(most):
    print(key, most[key])
