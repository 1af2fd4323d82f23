#!/usr/bin/env python
"""GPU benchmark of the fused backends (Triton, and the CUDA C++ kernels): forward+backward time and
peak extra memory.

Not a test: it asserts nothing about speed. For each loss (MACL layout ``2n``, CLIP), dtype
(fp32, bf16), embedding width ``D`` and batch size ``N`` it runs every requested backend
(``reference``: full-matrix autograd; ``torch``: chunked PyTorch; ``triton``: the fused kernels;
``triton_nosym``: the same with layout 2n's symmetric backward turned off, to measure what it
buys; ``cuda``: the CUDA C++ kernels of ``csrc/cuda``; ``infcl``: Inf-CL's ``cal_inf_loss``, CLIP only, when the ``inf_cl`` package is importable) and
records

* the median forward+backward time over ``--repeats`` runs, timed with CUDA events after
  ``--warmup`` untimed runs (the first of which autotunes the Triton kernels: sizes run in
  ascending ``N`` so that autotuning happens at the smallest one);
* the peak extra memory, ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats``
  minus the memory allocated before the run (inputs excluded, gradients included);
* the effective rate ``6 M K D / time``: the similarity matrix ``S`` is ``M x K`` (``M = K = 2N``
  for layout 2n, ``N`` for CLIP), and forward (``S``) plus backward (``dA``, ``dB``) are at least
  three ``M x K x D`` GEMMs of ``2 M K D`` flops. Beside it, ``torch.matmul``'s bf16 rate on an
  8192^3 GEMM measured in the same run, as the roof to compare with.

Shapes that do not fit are recorded as ``OOM`` (the reference's ``M x K`` matrices are skipped
up front when they clearly cannot fit), and a backend slower than ``--max-seconds`` at one ``N``
is skipped at larger ones. Writes ``bench.csv`` and ``bench.md`` under ``--out``, with the device
name and the torch / triton versions.

    python bench/gpu/bench_triton_gpu.py --out bench/results/h100_triton
    python bench/gpu/bench_triton_gpu.py --quick --out /tmp/quick
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

# Runnable from a source checkout without installing: the repository root (two folders up:
# bench/gpu/) on the path.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

LOSSES = ("macl_2n", "clip")
BACKENDS = ("reference", "torch", "triton", "triton_nosym", "cuda", "infcl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIELDS = ["device", "torch", "triton", "loss", "dtype", "N", "D", "M", "K", "backend", "status",
          "time_ms", "peak_extra_mib", "eff_tflops", "matmul_bf16_tflops", "note"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="directory for bench.csv and bench.md")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536], help="batch sizes N")
    p.add_argument("--d", type=int, nargs="+", default=[128, 256, 512], help="embedding widths D")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="skip a backend at larger N once one of its runs took longer than this")
    p.add_argument("--tf32", action="store_true",
                   help="allow tf32 for fp32 GEMMs (torch.set_float32_matmul_precision('high'))")
    p.add_argument("--quick", action="store_true", help="N=4096 and D=128 only, 3 repeats")
    return p.parse_args(argv)


def versions() -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton_version}


def matmul_bf16_tflops(size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return 2 * size ** 3 / seconds / 1e12


def infcl_loss() -> Optional[Callable]:
    """Inf-CL's CLIP loss, if installed: ``cal_inf_loss(q, k, scale=...)`` is the row-wise
    cross-entropy of ``scale * q k^T`` with the diagonal as positives."""
    try:
        from inf_cl import cal_inf_loss
    except Exception:  # not installed, or built for another torch
        return None

    def loss(z1, z2, scale):
        u1 = torch.nn.functional.normalize(z1, dim=1)
        u2 = torch.nn.functional.normalize(z2, dim=1)
        return 0.5 * (cal_inf_loss(u1, u2, scale=scale).mean()
                      + cal_inf_loss(u2, u1, scale=scale).mean())

    return loss


def make_step(loss: str, backend: str, z1, z2, scale) -> Optional[Callable]:
    """A closure running one forward+backward, or None when the backend does not apply."""
    import macl_kernels as mk

    if backend == "infcl":
        fn = infcl_loss()
        if fn is None or loss != "clip":
            return None
        forward = lambda: fn(z1, z2, scale)  # noqa: E731
    elif backend == "triton_nosym" and loss != "macl_2n":
        return None  # no symmetric path to turn off
    elif loss == "macl_2n":
        name = "triton" if backend == "triton_nosym" else backend
        forward = lambda: mk.macl_loss(z1, z2, layout="2n", backend=name)  # noqa: E731
    else:
        forward = lambda: mk.clip_loss(z1, z2, scale, backend=backend)  # noqa: E731

    def step():
        from macl_kernels.primitive.backends.triton import config as triton_config

        for t in (z1, z2, scale):
            t.grad = None
        triton_config.USE_SYMMETRY = backend != "triton_nosym"
        try:
            forward().backward()
        finally:
            triton_config.USE_SYMMETRY = True

    return step


def measure(step: Callable, warmup: int, repeats: int):
    """(median ms, peak extra MiB)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def reference_cannot_fit(m: int, k: int) -> bool:
    """The reference holds S, the logits, their softmax and gradients: several M x K fp32
    matrices. Skip it when four of them exceed the GPU's memory."""
    return 4 * 4 * m * k > torch.cuda.get_device_properties(0).total_memory


def run(args: argparse.Namespace) -> List[dict]:
    if args.quick:
        args.n, args.d, args.repeats = [4096], [128], 3
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    info = versions()
    roof = matmul_bf16_tflops()
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"torch.matmul bf16 8192^3: {roof:.1f} TFLOP/s", flush=True)
    rows = []
    for loss in args.losses:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for d in args.d:
                too_slow = set()
                for n in sorted(args.n):
                    m = k = 2 * n if loss == "macl_2n" else n
                    for backend in args.backends:
                        row = dict(info, loss=loss, dtype=dtype_name, N=n, D=d, M=m, K=k,
                                   backend=backend, status="", time_ms="", peak_extra_mib="",
                                   eff_tflops="", matmul_bf16_tflops=f"{roof:.1f}", note="")
                        if backend in too_slow:
                            row.update(status="skipped", note=f"> {args.max_seconds}s at smaller N")
                        elif backend == "reference" and reference_cannot_fit(m, k):
                            row.update(status="OOM", note="M x K matrices cannot fit (not run)")
                        else:
                            row = run_one(row, loss, backend, n, d, dtype, args)
                            if row["status"] == "ok" and float(row["time_ms"]) > 1e3 * args.max_seconds:
                                too_slow.add(backend)
                        if row["status"] != "n/a":
                            rows.append(row)
                            print(format_row(row), flush=True)
    return rows


def run_one(row: dict, loss: str, backend: str, n: int, d: int, dtype, args) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    z1 = z2 = scale = step = None
    try:
        z1 = torch.randn(n, d, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
        z2 = torch.randn(n, d, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
        scale = torch.tensor(1 / 0.07, device="cuda", requires_grad=True)
        step = make_step(loss, backend, z1, z2, scale)
        if step is None:
            row.update(status="n/a")
            return row
        t0 = time.perf_counter()
        ms, peak = measure(step, args.warmup, args.repeats)
        flops = 6 * row["M"] * row["K"] * d
        row.update(status="ok", time_ms=f"{ms:.3f}", peak_extra_mib=f"{peak:.1f}",
                   eff_tflops=f"{flops / (ms / 1e3) / 1e12:.2f}",
                   note=f"wall {time.perf_counter() - t0:.1f}s incl. warmup")
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM")
    except Exception as exc:  # record and go on: one failing backend must not end the sweep
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:160]}")
    finally:
        del z1, z2, scale, step
        torch.cuda.empty_cache()
    return row


def format_row(row: dict) -> str:
    return (f"{row['loss']:8s} {row['dtype']:4s} N={row['N']:6d} D={row['D']:4d} "
            f"{row['backend']:9s} {row['status']:7s} {row['time_ms']:>10s} ms "
            f"{row['peak_extra_mib']:>10s} MiB {row['eff_tflops']:>7s} TFLOP/s {row['note']}")


def write(rows: List[dict], out: str, args: argparse.Namespace) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    head = rows[0] if rows else versions()
    lines = [
        "# Triton backend, forward+backward on the GPU", "",
        f"Device: {head['device']}; torch {head['torch']}; triton {head['triton']}; "
        f"fp32 matmul precision: {'tf32 allowed' if args.tf32 else 'highest (no tf32)'}.",
        f"Command: `python {' '.join(sys.argv)}`", "",
        "Median of the timed runs (CUDA events); peak extra memory = max_memory_allocated minus "
        "the memory allocated before the run; effective TFLOP/s = 6 M K D / time (S is M x K).",
        "", f"torch.matmul bf16 (8192^3) in this run: "
        f"{rows[0]['matmul_bf16_tflops'] if rows else '?'} TFLOP/s", "",
        "| loss | dtype | N | D | backend | status | time (ms) | peak extra (MiB) | eff. TFLOP/s |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['dtype']} | {r['N']} | {r['D']} | {r['backend']} | "
                     f"{r['status']} | {r['time_ms']} | {r['peak_extra_mib']} | "
                     f"{r['eff_tflops']} |")
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    rows = run(args)
    write(rows, args.out, args)
    print(f"wrote {os.path.join(args.out, 'bench.csv')} and bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
