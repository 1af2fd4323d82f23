"""The Triton kernel inventory (``macl-kernels kernels``): compile, without a GPU, every
configuration the GPU shape rules can launch, and report what the compiled kernels use.

For each kernel of the Triton backend's ``KERNELS`` (``macl_kernels.primitive.backends.triton``,
its public names only: the one table of Triton kernels, a new kernel is inventoried once it is
registered there), each precision class of its ``PRECISIONS``, each ``BLOCK_D`` and each
constexpr flag set the kernel is launched with, the default tile shape (``AUTOTUNE`` off) and
the other autotune candidates that survive pruning are compiled for the target architecture with
Triton's bundled ptxas (``triton.compile`` on an ``ASTSource``; no driver, no GPU). From the
compiled kernel: registers per thread and spill (stack) bytes per thread from ``cuobjdump
-res-usage``, shared memory from the kernel's metadata, and whether the TTIR multiplies row
indices by strides in 64 bits (no ``arith.muli`` on an i32 tensor).

Each row is checked against the rules the shape tables promise: at most ``MAX_SPILL_BYTES`` of
spill, shared memory within the architecture's limit and within the figure the shape table
records for it, 64-bit row offsets. Which widths are ``refused`` is the backend's answer, not a
rule of this module: ``not_supported_reasons("triton", ...)`` (the one that ``auto``, an explicit
backend and ``info`` ask) for a CUDA device with the target's shared memory
(``Options.shared_limit``: a target, so this process's environment is not asked), per precision
class and width; a refused width is listed as ``refused`` rows with the backend's reasons (it
raises a ``ValueError`` there and ``auto`` passes over it) and nothing of it is compiled. A width
the backend accepts while a kernel's kind has no shape for it would fail at launch: a failing row.

Compiling needs Triton's NVIDIA backend and a process where ``TRITON_INTERPRET`` is not set
(kernels are decorated for the interpreter otherwise): ``cli.py`` re-runs itself without it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence

import torch

ARCHS = {"sm_80": 80, "sm_90": 90}
WIDTHS = (16, 32, 64, 128, 256, 512, 1024)
# What a chosen configuration may spill, per thread (a few stack slots are harmless; the
# pre-fix fp32 kernels spilled 7-17 KB).
MAX_SPILL_BYTES = 1024

COLUMNS = ("triton", "arch", "kernel", "precision", "block_d", "flags", "role", "block_m",
           "block_n", "num_warps", "num_stages", "registers", "spill_bytes", "shared_bytes",
           "shared_recorded", "shared_limit", "int64_offsets", "compile_s", "ok", "problem")


def _shared_limit(arch: str) -> int:
    from ..primitive.backends import triton as TF

    return TF.SHARED_MEMORY_LIMIT[ARCHS[arch]]


def _signature(spec, precision: str, constexprs: dict):
    """Triton signature and attributes of ``spec.function`` for ``precision`` operands: the
    operand pointers of the operand dtype, the index pointers int32 (the Triton backend narrows
    ``pos_index`` / ``self_index``; docs/design.md's glossary), the label pointers int64,
    every other pointer of the accumulator dtype, integers i32 (strides divisible by 16,
    pointers 16-byte aligned, as a real launch specialises them)."""
    from ..primitive.backends import triton as TF

    op, acc, _ = TF.PRECISIONS[precision]
    names = {"torch.float32": "fp32", "torch.float64": "fp64", "torch.bfloat16": "bf16",
             "torch.float16": "fp16"}
    op, acc = names[str(op)], names[str(acc)]
    signature, attrs = {}, {}
    for i, name in enumerate(spec.function.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = ("*i32" if name in spec.index_args else
                               "*i64" if name in spec.label_args else
                               "*" + (op if name in spec.operand_args else acc))
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("artanh"):  # kernels from before the scalars became tensors
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


_I32_TENSOR_PRODUCT = re.compile(r"arith\.muli [^\n]*: tensor<[0-9x]*xi32>")


def compile_config(spec, precision: str, block_d: int, flags: dict, shape, arch: str,
                   dot_precision: Optional[str] = None) -> dict:
    """Compile one configuration for ``arch`` and read its resources (no GPU needed).
    ``dot_precision`` overrides the precision class's (to inventory earlier rules)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..primitive.backends import triton as TF

    bm, bn, warps, stages = shape
    constexprs = dict(HAS_SELF=True, DOT_PRECISION=dot_precision or TF.PRECISIONS[precision][2],
                      UPCAST=False,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **flags)
    constexprs = {k: v for k, v in constexprs.items() if k in spec.function.arg_names}
    signature, attrs = _signature(spec, precision, constexprs)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(spec.function, signature, constexprs, attrs),
                            target=GPUTarget("cuda", ARCHS[arch], 32),
                            options=dict(num_warps=warps, num_stages=stages))
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if registers is None or stack is None:
        raise RuntimeError(f"cuobjdump reported no resource usage: {usage[-300:]}")
    return dict(registers=int(registers.group(1)), spill_bytes=int(stack.group(1)),
                shared_bytes=int(kernel.metadata.shared),
                int64_offsets=not _I32_TENSOR_PRODUCT.search(kernel.asm["ttir"]),
                compile_s=round(seconds, 1))


@contextlib.contextmanager
def float32_matmul_precision(value: str):
    """torch's float32 matmul precision set to ``value`` for the block (the Triton backend maps
    float32 to its precision class by it), then restored."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def backend_reasons(arch: str, precision: str, block_d: int) -> List[str]:
    """Why the Triton backend refuses width ``block_d`` for ``precision`` operands on ``arch``
    (``[]``: it serves it): the registry's ``not_supported_reasons`` for a CUDA device with the
    architecture's shared memory as ``Options.shared_limit`` (a target: no GPU needed, this
    process's environment not asked). The precision class is the backend's own mapping: the
    operand dtype (half dtypes upcast, as the losses pass them), float32 under the matmul
    precision whose ``tl.dot`` it names (tf32x3: "highest", tf32: "high")."""
    from ..primitive import Options, not_supported_reasons
    from ..primitive.backends import triton as TF

    operand, _, dot_precision = TF.PRECISIONS[precision]
    with float32_matmul_precision("highest" if dot_precision == "tf32x3" else "high"):
        if TF.precision_class(operand) != precision:  # a class the backend never chooses
            raise ValueError(f"precision {precision!r}: the triton backend maps {operand} "
                             f"operands to {TF.precision_class(operand)!r}")
        return list(not_supported_reasons("triton", torch.device("cuda"), operand, block_d,
                                          Options(shared_limit=_shared_limit(arch))))


def plan(arch: str, precisions: Sequence[str], widths: Sequence[int],
         kernels: Optional[Sequence[str]] = None, candidates: bool = True,
         flag_sets: str = "all") -> List[dict]:
    """The rows to compile (without results): one per kernel, precision, width, flag set and
    shape the shape rules can launch (``role`` default / candidate), and one ``refused`` row per
    kernel, precision and width the backend refuses (``backend_reasons``; ``problem`` says why).
    ``flag_sets="heaviest"`` keeps, per kernel, the first flag set that accumulates most
    (forward with E, the symmetric backward)."""
    from ..primitive.backends import triton as TF

    limit = _shared_limit(arch)
    refused = {(precision, block_d): backend_reasons(arch, precision, block_d)
               for precision in precisions for block_d in widths}
    rows = []
    for name, spec in TF.KERNELS.items():
        if kernels and name not in kernels:
            continue
        for precision in precisions:
            sets = spec.inventory_flags(precision)
            if flag_sets == "heaviest":
                sets = [_heaviest(sets)]
            for block_d in widths:
                base = dict(arch=arch, kernel=name, precision=precision, block_d=block_d,
                            shared_limit=limit)
                unshaped = dict(base, flags="", role="refused", block_m="", block_n="",
                                num_warps="", num_stages="")
                reasons = refused[(precision, block_d)]
                if reasons:
                    rows.append(dict(unshaped, ok=True,
                                     problem="backend refuses: " + "; ".join(reasons)))
                    continue
                shapes = TF.shape_candidates(spec.kind, precision, block_d, limit)
                if not shapes:  # served by the backend, no shape at launch: NoFittingShape
                    rows.append(dict(unshaped, ok=False, problem=(
                        f"the backend serves this width but the {spec.kind} table has no shape "
                        f"within {limit} B: the launch would raise NoFittingShape")))
                    continue
                if not candidates:
                    shapes = shapes[:1]
                for label, flags in sets:
                    for i, shape in enumerate(shapes):
                        rows.append(dict(
                            base, flags=label, role="default" if i == 0 else "candidate",
                            block_m=shape[0], block_n=shape[1], num_warps=shape[2],
                            num_stages=shape[3], _flags=flags,
                            shared_recorded=TF.measured_shared_memory(shape, block_d, precision,
                                                                spec.kind)))
    return rows


def _heaviest(sets):
    """The flag set with the most work per tile: the ARTANH map with E (forward), the
    mirrored ARTANH backward: the most live tiles and the float16 tf32 weight GEMMs."""
    def weight(item):
        flags = item[1]
        return (bool(flags.get("ACC_E")) + bool(flags.get("MIRRORED"))
                + 2 * (flags.get("LOGIT_MAP") == 1) + bool(flags.get("WIDE_WEIGHTS")))
    return max(sets, key=weight)


def _run_row(row: dict) -> dict:
    """Compile one planned row and judge it (a worker function: top level for the pool)."""
    import triton

    from ..primitive.backends import triton as TF

    row = dict(row)
    row["triton"] = triton.__version__
    if row["role"] == "refused":  # judged by plan: nothing to compile
        return row
    flags = row.pop("_flags")
    shape = (row["block_m"], row["block_n"], row["num_warps"], row["num_stages"])
    try:
        row.update(compile_config(TF.KERNELS[row["kernel"]], row["precision"], row["block_d"],
                                  flags, shape, row["arch"]))
    except Exception as exc:  # a compile failure is a finding, reported in the row
        row.update(ok=False, problem=f"compile failed: {type(exc).__name__}: {str(exc)[:200]}")
        return row
    problems = []
    if row["spill_bytes"] > MAX_SPILL_BYTES:
        problems.append(f"spills {row['spill_bytes']} B > {MAX_SPILL_BYTES}")
    if row["shared_bytes"] > row["shared_limit"]:
        problems.append(f"shared {row['shared_bytes']} B > limit {row['shared_limit']}")
    if row["shared_bytes"] > row["shared_recorded"]:
        problems.append(f"shared {row['shared_bytes']} B > recorded {row['shared_recorded']}")
    if not row["int64_offsets"]:
        problems.append("i32 row x stride products")
    row.update(ok=not problems, problem="; ".join(problems))
    return row


def run(rows: Sequence[dict], jobs: int = 1, progress=None) -> List[dict]:
    """Compile every planned row (``jobs`` processes), in order."""
    if jobs <= 1:
        done = []
        for row in rows:
            done.append(_run_row(row))
            if progress:
                progress(done[-1])
        return done
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        done = []
        for result in pool.map(_run_row, rows):
            done.append(result)
            if progress:
                progress(result)
        return done


def write_csv(rows: Iterable[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def summary(rows: Sequence[dict]) -> List[dict]:
    """Per precision and width: the worst spill and shared memory over the launched (default
    and candidate) configurations, and whether the width is refused."""
    out: Dict[tuple, dict] = {}
    for row in rows:
        key = (row["precision"], row["block_d"])
        entry = out.setdefault(key, dict(precision=row["precision"], block_d=row["block_d"],
                                         configs=0, worst_spill=0, worst_shared=0,
                                         refused=False, failures=0))
        if row["role"] == "refused":
            entry["refused"] = True
            entry["failures"] += not row["ok"]
            continue
        entry["configs"] += 1
        entry["worst_spill"] = max(entry["worst_spill"], int(row.get("spill_bytes") or 0))
        entry["worst_shared"] = max(entry["worst_shared"], int(row.get("shared_bytes") or 0))
        entry["failures"] += not row["ok"]
    return list(out.values())


def markdown(rows: Sequence[dict]) -> str:
    """The summary and every row as Markdown tables."""
    lines = ["| precision | BLOCK_D | configs | worst spill B | worst shared B | refused | "
             "failing |", "|---|---:|---:|---:|---:|---|---:|"]
    for s in summary(rows):
        lines.append(f"| {s['precision']} | {s['block_d']} | {s['configs']} | "
                     f"{s['worst_spill']} | {s['worst_shared']} | "
                     f"{'yes' if s['refused'] else ''} | {s['failures']} |")
    lines += ["", "| kernel | precision | BLOCK_D | flags | role | shape (M, N, warps, stages) "
                  "| regs | spill B | shared B | recorded B | ok |",
              "|---|---|---:|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        shape = ("" if r["role"] == "refused" else
                 f"{r['block_m']}x{r['block_n']}, {r['num_warps']}w, {r['num_stages']}s")
        lines.append(f"| {r['kernel']} | {r['precision']} | {r['block_d']} | {r['flags']} | "
                     f"{r['role']} | {shape} | {r.get('registers', '')} | "
                     f"{r.get('spill_bytes', '')} | {r.get('shared_bytes', '')} | "
                     f"{r.get('shared_recorded', '')} | "
                     f"{'yes' if r['ok'] else 'NO: ' + r['problem']} |")
    return "\n".join(lines) + "\n"
