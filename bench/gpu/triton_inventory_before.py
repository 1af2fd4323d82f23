"""The "before" side of the GPU-readiness inventory: the Triton kernels and shape rules as they
were before the GPU-readiness changes (commit f521c71), compiled for sm_90 without a GPU with the
same machinery as ``macl-kernels kernels`` (macl_kernels/tools/inventory.py).

Before: float32 at the default matmul precision ran ``input_precision="ieee"`` (FMA dots), the
shape rule was ``_default_shape(BLOCK_D, element size, kernel)`` with AUTOTUNE off, the scalars
were Python floats and the row offsets 32-bit. One row per kernel, precision and width, the
heaviest flag set of each kernel (as ``--flag-sets heaviest``), the default shape only.

A record of how ``before_*.csv`` in bench/results/gpu_sm90_compiled_resources/ was made: it
imports the modules of the tree that made them (``macl_kernels._inventory`` and
``macl_kernels.primitive.backends.triton_fused``, before the tools and the Triton backend moved
to ``macl_kernels/tools/`` and ``backends/triton/``); check out such a tree to rerun it.

Usage, from the repository root (TRITON_INTERPRET unset; for Triton 3.6 put it first on
PYTHONPATH, e.g. ``PYTHONPATH=/tmp/t36:.``):

    git show f521c71:macl_kernels/primitive/backends/triton_fused.py \\
        | sed 's/^from \\.\\._primitive import/from macl_kernels.primitive.protocol import/' \\
        > /tmp/triton_fused_before.py
    python bench/gpu/triton_inventory_before.py /tmp/triton_fused_before.py OUT.csv
"""

import importlib.util
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from macl_kernels import _inventory  # noqa: E402
from macl_kernels.primitive.backends import triton_fused as TF  # noqa: E402

spec = importlib.util.spec_from_file_location("triton_fused_before", sys.argv[1])
OLD = importlib.util.module_from_spec(spec)
spec.loader.exec_module(OLD)

ELEMENT = {"fp32": 4, "fp32-tf32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
DOT = {"fp32": "ieee", "fp32-tf32": "tf32", "bf16": "ieee", "fp16": "ieee", "fp64": "ieee"}
rows = []
for name, new_spec in TF.KERNELS.items():
    old_spec = new_spec._replace(function=getattr(OLD, new_spec.function.__name__))
    for precision in TF.PRECISIONS:
        label, flags = _inventory._heaviest(new_spec.inventory_flags(precision))
        for block_d in (128, 256, 512, 1024):
            shape = OLD._default_shape(block_d, ELEMENT[precision], name == "candidates")
            row = dict(arch="sm_90", kernel=name, precision=precision, block_d=block_d,
                       flags=label, role="default (before)", block_m=shape[0],
                       block_n=shape[1], num_warps=shape[2], num_stages=shape[3],
                       shared_limit=TF.H100_SHARED_MEMORY, shared_recorded="")
            try:
                row.update(_inventory.compile_config(old_spec, precision, block_d, flags, shape,
                                                     "sm_90", dot_precision=DOT[precision]))
                problems = [p for p, bad in (
                    (f"spills {row['spill_bytes']} B", row["spill_bytes"] > 1024),
                    (f"shared {row['shared_bytes']} B > limit",
                     row["shared_bytes"] > TF.H100_SHARED_MEMORY),
                    ("i32 row x stride products", not row["int64_offsets"])) if bad]
                row.update(ok=not problems, problem="; ".join(problems))
            except Exception as exc:
                row.update(ok=False, problem=f"compile failed: {type(exc).__name__}")
            import triton
            row["triton"] = triton.__version__
            print(name, precision, block_d, shape, {k: row.get(k) for k in (
                "registers", "spill_bytes", "shared_bytes", "int64_offsets", "problem")},
                flush=True)
            rows.append(row)
_inventory.write_csv(rows, sys.argv[2])
