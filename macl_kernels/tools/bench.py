"""``macl-kernels bench``: forward+backward time and peak memory per backend and batch size.

The parent side: ``run_bench`` starts one fresh worker process per (backend, N)
(``python -m macl_kernels.tools.worker bench``: ``worker.measure``; why fresh processes and how
the memory is read: ``worker.py``'s docstring), collects their JSON lines, and prints the table,
writes ``bench.csv`` and ``bench.png``. The worker

1. builds ``z1, z2 = randn(N, D)`` (fixed seed, requiring grad);
2. runs one small warm-up at ``N = 64`` to page in code and kernels;
3. measures the peak extra memory of one forward+backward;
4. times ``repeats`` further forward+backward runs and prints one JSON line.

The roofline: before the sweep, one more fresh worker (``worker.py matmul``, same thread count)
measures this machine's matmul rate in the benchmark's dtype, for a tile-sized and a
whole-matrix shape; every row then reports its useful GFLOP/s (``roofline.useful_flops`` of a
forward+backward step over the median time) and that as a fraction of the whole-matrix rate
(``fraction_of_matmul``) and of the tile rate (``fraction_of_matmul_tile``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import roofline as _roofline
from . import worker as _worker
from .cases import ALL_CASES as LOSS_CASES
from . import report
from .report import device_name, format_table
from .. import __version__

BENCH_LOSSES = ("macl", "infonce", "clip", "dcl", "tfree", "siglip", "infonce_labels",
                "macl_labels", "supcon")
FULL_SIZES = (1024, 2048, 4096, 8192)
QUICK_SIZES = (512, 1024, 2048)
FULL_REPEATS = 5
QUICK_REPEATS = 3
DEFAULT_TIMEOUT_S = 900.0

CSV_COLUMNS = (
    "device", "device_type", "torch_version", "macl_kernels_version", "torch_threads", "loss",
    "layout", "N", "D", "dtype", "backend", "repeats", "p20_s", "median_s", "p80_s",
    "peak_extra_bytes", "memory_method", "speedup_vs_reference", "memory_ratio_vs_reference",
    "error",
    # the roofline (appended last, so readers of the older columns keep working)
    "useful_gflop", "useful_gflops", "matmul_gflops", "matmul_tile_gflops", "fraction_of_matmul",
    "fraction_of_matmul_tile", "matmul_shape", "matmul_tile_shape",
)
MATMUL_TIMEOUT_S = 120.0


def default_layout(loss: str) -> str:
    """A loss defined on one layout only (CLIP: ``cross_sym``, SigLIP: ``cross``) gets that one;
    every other loss defaults to SimCLR's ``2n``."""
    layouts = LOSS_CASES[loss].layouts if loss in LOSS_CASES else ()
    return layouts[0] if len(layouts) == 1 else "2n"


@dataclass
class BenchConfig:
    loss: str = "macl"
    layout: str = "2n"
    sizes: Sequence[int] = FULL_SIZES
    dim: int = 128
    dtype: str = "float32"
    backends: Sequence[str] = ("reference", "torch")
    device: str = "cpu"
    repeats: int = FULL_REPEATS
    seed: int = 0
    threads: Optional[int] = None
    timeout_s: float = DEFAULT_TIMEOUT_S


# --------------------------------------------------------------------------------------------
# Parent side: the sweep, the table, the CSV and the plot
# --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    backend: str
    n: int
    result: Dict = field(default_factory=dict)  # the worker's JSON, or {"ok": False, "error"}

    @property
    def ok(self) -> bool:
        return bool(self.result.get("ok"))


def worker_command(kind: str, config: "BenchConfig", backend: str, n: int) -> List[str]:
    """The command line of one ``kind`` (``bench`` or ``profile``) measurement by the worker."""
    options = ["--loss", config.loss, "--layout", config.layout, "--backend", backend,
               "--n", str(n), "--dim", str(config.dim), "--dtype", config.dtype,
               "--device", config.device, "--repeats", str(config.repeats),
               "--seed", str(config.seed)]
    if config.threads:
        options += ["--threads", str(config.threads)]
    return _worker.command(kind, options)


def run_worker(config: BenchConfig, backend: str, n: int) -> Dict:
    """Run one measurement in a fresh interpreter; failures come back as ``{"ok": False}``."""
    return _worker.run_worker_process(worker_command("bench", config, backend, n),
                                      config.timeout_s)


def run_matmul_worker(config: BenchConfig) -> Dict:
    """This machine's matmul rate for ``config`` (its dtype, device and threads; the shapes of its
    largest N) in a fresh worker process, like every measurement; ``{"ok": False, "error"}`` on
    failure (the sweep goes on without the roofline columns)."""
    options = ["--layout", config.layout, "--n-max", str(max(config.sizes)),
               "--dim", str(config.dim), "--dtype", config.dtype, "--device", config.device,
               "--seed", str(config.seed)]
    if config.threads:
        options += ["--threads", str(config.threads)]
    return _worker.run_worker_process(_worker.command("matmul", options),
                                      min(config.timeout_s, MATMUL_TIMEOUT_S))


def roofline_columns(layout: str, n: int, dim: int, seconds: Optional[float],
                     rates: Optional[Dict], phase: str = "step") -> Dict:
    """``useful_gflop`` (of ``phase``), ``useful_gflops`` (over ``seconds``) and its fractions of
    the whole-matrix and the tile matmul rate (empty where a value is missing)."""
    rates = rates if rates and rates.get("ok") else {}
    gflop = _roofline.useful_flops(layout, n, dim, phase) / 1e9
    gflops = gflop / seconds if seconds else None
    return {
        "useful_gflop": gflop, "useful_gflops": gflops,
        "matmul_gflops": rates.get("matmul_gflops"),
        "matmul_tile_gflops": rates.get("matmul_tile_gflops"),
        "fraction_of_matmul": _roofline.fraction(gflops, rates.get("matmul_gflops")),
        "fraction_of_matmul_tile": _roofline.fraction(gflops, rates.get("matmul_tile_gflops")),
        "matmul_shape": rates.get("matmul_shape"),
        "matmul_tile_shape": rates.get("matmul_tile_shape"),
    }


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional ("bench" extra) dependency
        return None
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def sweep(config: BenchConfig, progress: bool = True) -> List[Measurement]:
    tasks = [(backend, n) for n in config.sizes for backend in config.backends]
    bar = _progress(len(tasks), progress)
    measurements = []
    for backend, n in tasks:
        if bar is not None:
            bar.set_postfix_str(f"{backend} N={n}")
        measurements.append(Measurement(backend, n, run_worker(config, backend, n)))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return measurements


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def csv_rows(config: BenchConfig, measurements: Sequence[Measurement],
             rates: Optional[Dict] = None) -> List[Dict]:
    """One dict per measurement with the columns of ``CSV_COLUMNS`` (ratios vs the reference at
    the same N; empty when the reference was not run there or failed; the roofline columns
    against ``rates``, the result of ``run_matmul_worker``, empty without it)."""

    reference = {m.n: m.result for m in measurements if m.backend == "reference" and m.ok}
    dev_name = device_name(config.device)
    rows = []
    for m in measurements:
        r, ref = m.result, reference.get(m.n, {})
        ok = m.ok
        rows.append({
            "device": dev_name, "device_type": torch.device(config.device).type,
            "torch_version": torch.__version__, "macl_kernels_version": __version__,
            "torch_threads": r.get("torch_threads", config.threads or torch.get_num_threads()),
            "loss": config.loss, "layout": config.layout, "N": m.n, "D": config.dim,
            "dtype": config.dtype, "backend": m.backend, "repeats": config.repeats,
            "p20_s": r.get("p20_s"), "median_s": r.get("median_s"), "p80_s": r.get("p80_s"),
            "peak_extra_bytes": r.get("peak_extra_bytes"),
            "memory_method": r.get("memory_method"),
            "speedup_vs_reference": _ratio(ref.get("median_s"), r.get("median_s")) if ok else None,
            "memory_ratio_vs_reference":
                _ratio(r.get("peak_extra_bytes"), ref.get("peak_extra_bytes")) if ok else None,
            "error": None if ok else r.get("error", "unknown error"),
            **roofline_columns(config.layout, m.n, config.dim,
                               r.get("median_s") if ok else None, rates),
        })
    return rows


def write_csv(path: str, rows: Sequence[Dict]) -> None:
    report.write_csv(path, CSV_COLUMNS, rows)


def format_results(rows: Sequence[Dict]) -> str:

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    header = ["N", "D", "dtype", "backend", "median ms", "p20-p80 ms", "peak extra MiB",
              "speedup", "mem ratio", "GFLOP/s", "of matmul", "of tile", "error"]
    table = []
    for r in rows:
        if r["error"]:
            table.append([r["N"], r["D"], r["dtype"], r["backend"]] + ["-"] * 8
                         + [r["error"][:60]])
            continue
        table.append([
            r["N"], r["D"], r["dtype"], r["backend"], num(1e3 * r["median_s"], ".1f"),
            f"{1e3 * r['p20_s']:.1f}-{1e3 * r['p80_s']:.1f}",
            num(r["peak_extra_bytes"] / 2**20, ".1f"),
            num(r["speedup_vs_reference"], ".2f") + ("x" if r["speedup_vs_reference"] else ""),
            num(r["memory_ratio_vs_reference"], ".3f"), num(r.get("useful_gflops"), ".1f"),
            num(r.get("fraction_of_matmul"), ".2f"), num(r.get("fraction_of_matmul_tile"), ".2f"),
            "",
        ])
    return format_table(header, table, right_align=[True, True, False, False] + [True] * 8)


def plot(path: str, config: BenchConfig, rows: Sequence[Dict]) -> bool:
    """Time and peak memory against N (log-log) and the fraction of the matmul rate against N,
    one line per backend; ``False`` without matplotlib (an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_time, ax_mem, ax_roof) = plt.subplots(1, 3, figsize=(16, 4.5))
    for backend in config.backends:
        ok = [r for r in rows if r["backend"] == backend and not r["error"]]
        if ok:
            ax_time.plot([r["N"] for r in ok], [1e3 * r["median_s"] for r in ok], "o-",
                         label=backend)
        roof = [r for r in ok if r.get("fraction_of_matmul") is not None]
        if roof:
            ax_roof.plot([r["N"] for r in roof], [r["fraction_of_matmul"] for r in roof], "o-",
                         label=backend)
        # Zero extra memory (tiny N) has no place on a log axis.
        mem = [r for r in ok if r["peak_extra_bytes"]]
        if mem:
            ax_mem.plot([r["N"] for r in mem], [r["peak_extra_bytes"] / 2**20 for r in mem],
                        "o-", label=backend)
    for ax, ylabel in ((ax_time, "forward+backward median time (ms)"),
                       (ax_mem, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (rows per view)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(list(config.sizes))
        ax.set_xticklabels([str(n) for n in config.sizes])
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    plot_roofline_axis(ax_roof, config.sizes, rows, "forward+backward")
    device = rows[0]["device"] if rows else config.device
    fig.suptitle(f"{config.loss} ({config.layout}), D={config.dim}, {config.dtype} on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_roofline_axis(ax, sizes: Sequence[int], rows: Sequence[Dict], what: str) -> None:
    """Axis labels, the 1.0 line and the matmul rates of a fraction-of-the-matmul-rate panel
    (shared by bench and profile)."""
    rate = next((r for r in rows if r.get("matmul_gflops")), None)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes))
    ax.set_xticklabels([str(n) for n in sizes])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("N (rows per view)")
    ax.set_ylabel(f"fraction of the matmul rate ({what})")
    ax.grid(True, which="both", alpha=0.3)
    if rate is not None:
        ax.set_title(f"matmul {rate['matmul_shape']}: {rate['matmul_gflops']:.1f} GFLOP/s "
                     f"(tile {rate['matmul_tile_gflops']:.1f})", fontsize=9)
    else:
        ax.set_title("matmul rate not measured", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def run_bench(config: BenchConfig, out_dir: str, progress: bool = True) -> int:
    """The sweep, its table on stdout, ``bench.csv`` and ``bench.png`` in ``out_dir``.

    Returns 0 when at least one measurement succeeded (failures such as the reference running
    out of memory at large N are results, recorded in the CSV), 1 when none did.
    """

    start = time.perf_counter()
    print(f"bench: loss={config.loss} layout={config.layout} D={config.dim} "
          f"dtype={config.dtype} device={config.device} ({device_name(config.device)}), "
          f"N in {list(config.sizes)}, backends {list(config.backends)}, "
          f"{config.repeats} timed repeats, torch threads "
          f"{config.threads or torch.get_num_threads()}, one fresh process per measurement",
          flush=True)
    rates = run_matmul_worker(config)
    print(_roofline.describe_rates(rates), flush=True)
    measurements = sweep(config, progress=progress)
    rows = csv_rows(config, measurements, rates)
    print(format_results(rows))
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "bench.csv")
    png_path = os.path.join(out_dir, "bench.png")
    write_csv(csv_path, rows)
    plotted = plot(png_path, config, rows)
    failed = sum(1 for m in measurements if not m.ok)
    print(f"\nwrote {csv_path}" + (f" and {png_path}" if plotted else
                                  " (no plot: matplotlib is not installed)"))
    print(f"{len(measurements) - failed}/{len(measurements)} measurements succeeded in "
          f"{time.perf_counter() - start:.1f} s; speedup = reference time / time, "
          f"mem ratio = peak extra memory / reference's; GFLOP/s = useful flops of a "
          f"forward+backward step (docs/math.md#roofline-useful-work-and-the-matmul-rate) / "
          f"median time; of matmul / of tile = that / the whole-matrix / tile matmul rate")
    return 0 if failed < len(measurements) else 1
