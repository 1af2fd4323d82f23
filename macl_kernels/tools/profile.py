"""``macl-kernels profile``: where the time and the memory of one loss step go, per backend.

For a loss, a list of batch sizes and a list of backends it reports

* the **per-phase breakdown** of one training step of the loss: *normalise* (the L2
  normalisation of both views in the compute dtype: the values the functional layer computes),
  *forward* (the loss on the unit rows, ``normalize=False``) and *backward* (``loss.backward()`` back to the raw embeddings, i.e.
  including normalisation's backward); medians over ``--repeats`` timed steps, the device
  synchronised around each phase;
* the **peak memory** of the step: the peak of the process's memory during one step minus the
  memory before the inputs were created, so it counts the inputs ``z1, z2``, their gradients and
  every temporary of the loss (``peak_bytes``); and the peak extra memory of the forward
  (normalise + forward) and of the backward phase over the memory at the start of each phase.
  On the CPU: the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``, see
  ``worker.py``); on CUDA: ``torch.cuda.max_memory_allocated``;
* the **throughput**, pairs per second: ``N`` (rows per view, i.e. training samples whose two
  views are compared) divided by the median step time;
* the **roofline**: the useful GFLOP/s of the forward, the backward and the whole step (the minimum
  multiply-adds of ``roofline.useful_flops`` per phase over the phase's median time; the
  normalisation is not counted as work but its time is in the step's) and each as a fraction of
  this machine's matmul rate, measured in the same run by one more fresh worker
  (``bench.run_matmul_worker``: the profile's dtype, a whole-matrix and a tile-sized shape);
* the **top operators** of one step from ``torch.profiler`` (self time per operator, grouped by
  phase through ``record_function``), in ``ops.csv``;
* the **largest batch that fits a memory budget** (``--budget-gb``) for each backend, found by
  measuring: ``N`` doubles from ``--search-start`` until a step's ``peak_bytes`` exceeds the
  budget, fails (out of memory) or ``--search-max-n`` is reached, then bisects between the last
  fit and the first miss to ``--search-resolution``. Each probe runs one step in a fresh process
  (peak memory is per process), with a per-probe timeout and a total time cap per backend
  (``--search-time``); a probe whose memory, extrapolated from the last two probes, would exceed
  1.5 x the budget is not run but recorded as ``predicted`` (so the search never asks the machine
  for far more memory than the budget). On the CPU each probe also caps its address space at its
  baseline plus 1.25 x the budget (``RLIMIT_AS``), so that an allocation beyond it fails cleanly in
  that process instead of pressing the machine; on CUDA the per-process memory fraction is capped
  the same way.

Everything measured runs in fresh subprocesses (``python -m macl_kernels.tools.worker profile``:
``worker.measure_profile``, the step of ``worker.LossStep`` in its phases), one per (backend, N),
as ``macl-kernels bench`` does. The normalise phase is ``torch.nn.functional.normalize`` in the
compute dtype: the values of the losses' own normalisation (whose fused backward the loss step
of ``bench`` uses; here the backward phase runs autograd's backward of ``normalize``). Outputs
in ``--out``: ``profile.csv``, ``ops.csv``, ``capacity.csv`` and ``profile.png`` (time per
phase, memory against N with the budget and the search's probes, throughput).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import bench as _bench
from . import roofline as _roofline
from . import worker as _worker
from .report import device_name, format_table, write_csv
from .. import __version__

PROFILE_LOSSES = ("macl", "infonce", "clip", "dcl", "dclw", "tfree", "siglip", "infonce_labels",
                  "macl_labels", "supcon")
PHASES = _worker.PHASES
DEFAULT_SIZES = (1024, 2048, 4096)
DEFAULT_REPEATS = 3
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_SEARCH_START = 1024
DEFAULT_SEARCH_MAX_N = 32768
DEFAULT_SEARCH_TIME_S = 600.0
DEFAULT_SEARCH_RESOLUTION = 0.0625  # bisect until (miss - fit) <= resolution * fit
GIB = _worker.GIB

PROFILE_COLUMNS = (
    "device", "device_type", "torch_version", "macl_kernels_version", "torch_threads", "loss",
    "layout", "N", "anchors", "D", "dtype", "backend", "repeats", "normalise_ms", "forward_ms",
    "backward_ms", "step_ms", "pairs_per_s", "peak_bytes", "forward_peak_extra_bytes",
    "backward_peak_extra_bytes", "memory_method", "error",
    # the roofline (appended last, so readers of the older columns keep working)
    "forward_useful_gflops", "backward_useful_gflops", "step_useful_gflops", "matmul_gflops",
    "matmul_tile_gflops", "forward_fraction_of_matmul", "backward_fraction_of_matmul",
    "step_fraction_of_matmul", "step_fraction_of_matmul_tile", "matmul_shape",
    "matmul_tile_shape",
)
OPS_COLUMNS = ("backend", "N", "phase", "rank", "op", "self_ms", "calls")
CAPACITY_COLUMNS = (
    "device", "loss", "layout", "D", "dtype", "backend", "budget_bytes", "max_fit_N",
    "max_fit_anchors", "max_fit_peak_bytes", "first_miss_N", "first_miss_reason", "hit_cap",
    "cap_N", "hit_time_limit", "search_s", "probes",
)


@dataclass
class ProfileConfig(_bench.BenchConfig):
    """``bench``'s configuration (loss, layout, sizes, backends, ...) plus the profile's own."""

    sizes: Sequence[int] = DEFAULT_SIZES
    repeats: int = DEFAULT_REPEATS
    timeout_s: float = DEFAULT_TIMEOUT_S
    op_profile: bool = True
    budget_gb: Optional[float] = None
    search_start: int = DEFAULT_SEARCH_START
    search_max_n: int = DEFAULT_SEARCH_MAX_N
    search_time_s: float = DEFAULT_SEARCH_TIME_S
    search_resolution: float = DEFAULT_SEARCH_RESOLUTION


anchors_of = _worker.anchors_of


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def run_worker(config: ProfileConfig, backend: str, n: int, probe: bool = False,
               timeout_s: Optional[float] = None) -> Dict:
    """One measurement in a fresh interpreter; failures come back as ``{"ok": False}``."""
    cmd = _bench.worker_command("profile", config, backend, n)
    if not config.op_profile:
        cmd.append("--no-op-profile")
    if probe:
        cmd.append("--probe")
        if config.budget_gb:
            cmd += ["--budget-bytes", str(int(config.budget_gb * GIB))]
    return _worker.run_worker_process(cmd, config.timeout_s if timeout_s is None else timeout_s,
                                      oom_signals=("SIGKILL", "SIGSEGV", "SIGABRT"))


@dataclass
class Capacity:
    backend: str
    budget_bytes: int
    probes: List[Tuple[int, Optional[int], str]] = field(default_factory=list)  # N, bytes, note
    max_fit: Optional[int] = None
    max_fit_bytes: Optional[int] = None
    first_miss: Optional[int] = None
    miss_reason: str = ""
    hit_cap: bool = False
    hit_time_limit: bool = False
    seconds: float = 0.0


def _predict(probes: Sequence[Tuple[int, Optional[int], str]], n: int) -> Optional[float]:
    """Peak memory at ``n`` extrapolated as a power law through the two largest measured fits."""
    pts = sorted((p, b) for p, b, note in probes if b and note == "fits")
    if len(pts) < 2:
        return None
    (n0, b0), (n1, b1) = pts[-2], pts[-1]
    if n1 == n0 or b0 <= 0 or b1 <= 0:
        return None
    import math

    slope = max(0.0, math.log(b1 / b0) / math.log(n1 / n0))
    return b1 * (n / n1) ** slope


def search_capacity(config: ProfileConfig, backend: str, progress=None) -> Capacity:
    """Largest N whose step fits ``config.budget_gb``: double, then bisect (see the module
    docstring), each probe in a fresh process, within ``config.search_time_s``."""
    budget = int(config.budget_gb * GIB)
    cap = Capacity(backend, budget)
    start = time.perf_counter()
    deadline = start + config.search_time_s

    def probe(n: int) -> bool:
        """True when N fits; records the probe."""
        predicted = _predict(cap.probes, n)
        if predicted is not None and predicted > 1.5 * budget:
            cap.probes.append((n, int(predicted), "predicted"))
            reason = f"predicted {predicted / GIB:.1f} GiB > 1.5 x budget (not run)"
            ok = False
        else:
            remaining = max(1.0, min(config.timeout_s, deadline - time.perf_counter()))
            r = run_worker(config, backend, n, probe=True, timeout_s=remaining)
            if r.get("ok"):
                ok = r["peak_bytes"] <= budget
                cap.probes.append((n, r["peak_bytes"], "fits" if ok else "over"))
                reason = "" if ok else f"{r['peak_bytes'] / GIB:.2f} GiB measured"
            else:
                ok = False
                cap.probes.append((n, None, "failed"))
                reason = r.get("error", "failed")
                if "timed out" in reason:
                    cap.hit_time_limit = True
        if progress is not None:
            progress(backend, n, cap.probes[-1])
        if ok:
            if cap.max_fit is None or n > cap.max_fit:
                cap.max_fit, cap.max_fit_bytes = n, cap.probes[-1][1]
        elif cap.first_miss is None or n < cap.first_miss:
            cap.first_miss, cap.miss_reason = n, reason
        return ok

    def time_left() -> bool:
        if time.perf_counter() >= deadline:
            cap.hit_time_limit = True
            return False
        return True

    n = max(2, min(config.search_start, config.search_max_n))
    while time_left():
        if not probe(n):
            break
        if n >= config.search_max_n:
            cap.hit_cap = True
            break
        n = min(2 * n, config.search_max_n)
    # Bisect between the largest fit and the smallest miss.
    step_mult = 16  # bisected N stay multiples of 16
    while (cap.max_fit is not None and cap.first_miss is not None and time_left()
           and cap.first_miss - cap.max_fit > max(step_mult,
                                                  config.search_resolution * cap.max_fit)):
        mid = (cap.max_fit + cap.first_miss) // 2
        mid = max(cap.max_fit + 1, mid - mid % step_mult)
        if mid >= cap.first_miss:
            break
        probe(mid)
    cap.seconds = time.perf_counter() - start
    return cap


def csv_rows(config: ProfileConfig, results: Sequence[Tuple[str, int, Dict]],
             rates: Optional[Dict] = None) -> List[Dict]:
    """One dict per (backend, N) with the columns of ``PROFILE_COLUMNS``; the roofline columns
    against ``rates`` (``_bench.run_matmul_worker``'s result), empty without it."""

    dev_name = device_name(config.device)
    rows = []
    for backend, n, r in results:
        ok = bool(r.get("ok"))
        row = {
            "device": dev_name, "device_type": torch.device(config.device).type,
            "torch_version": torch.__version__, "macl_kernels_version": __version__,
            "torch_threads": r.get("torch_threads", config.threads or torch.get_num_threads()),
            "loss": config.loss, "layout": config.layout, "N": n,
            "anchors": anchors_of(config.layout, n), "D": config.dim, "dtype": config.dtype,
            "backend": backend, "repeats": config.repeats,
            "error": None if ok else r.get("error", "unknown error"),
        }
        for key in ("normalise_ms", "forward_ms", "backward_ms", "step_ms", "pairs_per_s",
                    "peak_bytes", "forward_peak_extra_bytes", "backward_peak_extra_bytes",
                    "memory_method"):
            row[key] = r.get(key) if ok else None
        for phase in _roofline.ROOFLINE_PHASES:
            ms = row[f"{phase}_ms"]
            roof = _bench.roofline_columns(config.layout, n, config.dim,
                                           ms / 1e3 if ms else None, rates, phase)
            row[f"{phase}_useful_gflops"] = roof["useful_gflops"]
            row[f"{phase}_fraction_of_matmul"] = roof["fraction_of_matmul"]
        for key in ("matmul_gflops", "matmul_tile_gflops", "matmul_shape", "matmul_tile_shape"):
            row[key] = roof[key]
        row["step_fraction_of_matmul_tile"] = roof["fraction_of_matmul_tile"]
        rows.append(row)
    return rows


def capacity_rows(config: ProfileConfig, caps: Sequence[Capacity]) -> List[Dict]:

    dev_name = device_name(config.device)
    return [{
        "device": dev_name, "loss": config.loss, "layout": config.layout, "D": config.dim,
        "dtype": config.dtype, "backend": c.backend, "budget_bytes": c.budget_bytes,
        "max_fit_N": c.max_fit,
        "max_fit_anchors": anchors_of(config.layout, c.max_fit) if c.max_fit else None,
        "max_fit_peak_bytes": c.max_fit_bytes, "first_miss_N": c.first_miss,
        "first_miss_reason": c.miss_reason or None, "hit_cap": c.hit_cap,
        "cap_N": config.search_max_n, "hit_time_limit": c.hit_time_limit,
        "search_s": round(c.seconds, 1),
        "probes": " ".join(f"{n}:{'-' if b is None else b}:{note}" for n, b, note in c.probes),
    } for c in caps]


def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.1f}"


def format_profile(rows: Sequence[Dict]) -> str:

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    def frac(v):
        return "-" if v is None else f"{v:.2f}"

    header = ["N", "anchors", "backend", "normalise ms", "forward ms", "backward ms", "step ms",
              "pairs/s", "peak MiB", "fwd extra MiB", "bwd extra MiB", "step GFLOP/s",
              "fwd/mm", "bwd/mm", "step/mm", "error"]
    table = []
    for r in rows:
        if r["error"]:
            table.append([r["N"], r["anchors"], r["backend"]] + ["-"] * 12 + [r["error"][:60]])
            continue
        table.append([r["N"], r["anchors"], r["backend"], ms(r["normalise_ms"]),
                      ms(r["forward_ms"]), ms(r["backward_ms"]), ms(r["step_ms"]),
                      f"{r['pairs_per_s']:.0f}", _mib(r["peak_bytes"]),
                      _mib(r["forward_peak_extra_bytes"]), _mib(r["backward_peak_extra_bytes"]),
                      "-" if r.get("step_useful_gflops") is None
                      else f"{r['step_useful_gflops']:.1f}",
                      frac(r.get("forward_fraction_of_matmul")),
                      frac(r.get("backward_fraction_of_matmul")),
                      frac(r.get("step_fraction_of_matmul")), ""])
    return format_table(header, table, right_align=[True, True, False] + [True] * 12)


def format_capacity(config: ProfileConfig, rows: Sequence[Dict]) -> str:

    header = ["backend", "budget GiB", "largest N", "anchors", "its peak MiB", "first miss N",
              "why", "cap hit", "search s"]
    table = []
    for r in rows:
        table.append([
            r["backend"], f"{r['budget_bytes'] / GIB:g}",
            "-" if r["max_fit_N"] is None else r["max_fit_N"],
            "-" if r["max_fit_anchors"] is None else r["max_fit_anchors"],
            _mib(r["max_fit_peak_bytes"]),
            "-" if r["first_miss_N"] is None else r["first_miss_N"],
            (r["first_miss_reason"] or ("-" if not r["hit_cap"] else "cap"))[:48],
            f"yes (N={r['cap_N']})" if r["hit_cap"] else "no",
            f"{r['search_s']:.0f}" + (" (time cap)" if r["hit_time_limit"] else ""),
        ])
    return format_table(header, table, right_align=[False, True, True, True, True, True])


def plot(path: str, config: ProfileConfig, rows: Sequence[Dict],
         caps: Sequence[Capacity]) -> bool:
    """Four panels: step time per phase against N (log-log), memory against N with the budget
    and the capacity search's probes, throughput against N, and the fraction of the matmul rate
    (step, forward, backward) against N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ((ax_t, ax_m), (ax_p, ax_f)) = plt.subplots(2, 2, figsize=(13, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"normalise": ":", "forward": "--", "backward": "-."}
    for i, backend in enumerate(config.backends):
        color = colors[i % len(colors)]
        ok = sorted((r for r in rows if r["backend"] == backend and not r["error"]),
                    key=lambda r: r["N"])
        if ok:
            ns = [r["N"] for r in ok]
            ax_t.plot(ns, [r["step_ms"] for r in ok], "o-", color=color, label=f"{backend} step")
            for phase, style in styles.items():
                vals = [max(r[f"{phase}_ms"], 1e-3) for r in ok]
                ax_t.plot(ns, vals, style, color=color, alpha=0.7, label=f"{backend} {phase}")
            ax_p.plot(ns, [r["pairs_per_s"] for r in ok], "o-", color=color, label=backend)
            for phase, style in (("step", "o-"), ("forward", "--"), ("backward", "-.")):
                pts = [(r["N"], r[f"{phase}_fraction_of_matmul"]) for r in ok
                       if r.get(f"{phase}_fraction_of_matmul") is not None]
                if pts:
                    ax_f.plot(*zip(*pts), style, color=color,
                              alpha=1.0 if phase == "step" else 0.7, label=f"{backend} {phase}")
        mem_pts = {r["N"]: r["peak_bytes"] for r in ok if r["peak_bytes"]}
        cap = next((c for c in caps if c.backend == backend), None)
        if cap is not None:
            for n, b, note in cap.probes:
                if b and note in ("fits", "over"):
                    mem_pts.setdefault(n, b)
        if mem_pts:
            ns = sorted(mem_pts)
            ax_m.plot(ns, [mem_pts[n] / 2 ** 20 for n in ns], "o-", color=color, label=backend)
        if cap is not None and cap.max_fit and cap.max_fit_bytes:
            ax_m.plot([cap.max_fit], [cap.max_fit_bytes / 2 ** 20], "*", ms=14, color=color,
                      label=f"{backend}: largest N={cap.max_fit}"
                            + (" (cap)" if cap.hit_cap else ""))
    if config.budget_gb:
        ax_m.axhline(config.budget_gb * 1024, color="k", ls="--", lw=1,
                     label=f"budget {config.budget_gb:g} GiB")
    for ax, ylabel in ((ax_t, "time per step (ms, median)"),
                       (ax_m, "peak memory of a step (MiB, incl. inputs)"),
                       (ax_p, "throughput (pairs / s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (rows per view)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _bench.plot_roofline_axis(ax_f, sorted({r["N"] for r in rows}) or list(config.sizes), rows,
                              "phase")
    device = rows[0]["device"] if rows else config.device
    fig.suptitle(f"profile: {config.loss} ({config.layout}), D={config.dim}, {config.dtype} "
                 f"on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_profile(config: ProfileConfig, out_dir: str, progress: bool = True) -> int:
    """Measure, print the tables, write the CSVs and the plot. Exit status 0 when at least one
    measurement succeeded, 1 otherwise."""

    started = time.perf_counter()
    print(f"profile: loss={config.loss} layout={config.layout} D={config.dim} "
          f"dtype={config.dtype} device={config.device} ({device_name(config.device)}), "
          f"N in {list(config.sizes)}, backends {list(config.backends)}, {config.repeats} timed "
          f"repeats, torch threads {config.threads or torch.get_num_threads()}"
          + (f", budget {config.budget_gb:g} GiB" if config.budget_gb else ""), flush=True)
    rates = _bench.run_matmul_worker(config)
    print(_roofline.describe_rates(rates), flush=True)
    tasks = [(b, n) for n in config.sizes for b in config.backends]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(tasks), desc="profile", unit="run", file=sys.stderr,
                       dynamic_ncols=True)
        except ImportError:
            pass
    results = []
    for backend, n in tasks:
        if bar is not None:
            bar.set_postfix_str(f"{backend} N={n}")
        results.append((backend, n, run_worker(config, backend, n)))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rows = csv_rows(config, results, rates)
    print(format_profile(rows))
    print("(phases: normalise = L2 normalisation of both views; forward = the loss on unit rows; "
          "backward = loss.backward() to the raw embeddings. peak = step's peak memory incl. "
          "inputs and gradients; pairs/s = N / step time; step GFLOP/s = useful flops of the step "
          "(docs/math.md#roofline-useful-work-and-the-matmul-rate) / step time; fwd/mm, bwd/mm, "
          "step/mm = a phase's useful GFLOP/s / the whole-matrix matmul rate)")

    caps: List[Capacity] = []
    if config.budget_gb:
        print(f"\ncapacity search: largest N per backend whose step fits {config.budget_gb:g} "
              f"GiB (doubling from N={config.search_start}, cap N={config.search_max_n}, "
              f"{config.search_time_s:g} s per backend)", flush=True)

        def report(backend, n, p):
            _, b, note = p
            if progress:
                print(f"  {backend} N={n}: {note}"
                      + ("" if b is None else f" ({b / 2 ** 20:.0f} MiB)"), file=sys.stderr,
                      flush=True)

        for backend in config.backends:
            caps.append(search_capacity(config, backend, report))
        cap_rows = capacity_rows(config, caps)
        print(format_capacity(config, cap_rows))
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "profile.csv"), os.path.join(out_dir, "ops.csv")]
    write_csv(paths[0], PROFILE_COLUMNS, rows)
    ops = [{"backend": b, "N": n, **op} for b, n, r in results for op in r.get("ops", [])]
    write_csv(paths[1], OPS_COLUMNS, ops)
    if caps:
        paths.append(os.path.join(out_dir, "capacity.csv"))
        write_csv(paths[-1], CAPACITY_COLUMNS, capacity_rows(config, caps))
    png = os.path.join(out_dir, "profile.png")
    if plot(png, config, rows, caps):
        paths.append(png)
    if ops:
        largest = max(n for _, n, r in results if r.get("ok"))
        print(f"\ntop operators at N={largest} (torch.profiler, self time; all in ops.csv):")
        for backend in config.backends:
            top = [o for o in ops if o["backend"] == backend and o["N"] == largest
                   and o["rank"] <= 3 and o["phase"] in PHASES]
            text = "; ".join(f"{o['phase']}: {o['op']} {o['self_ms']:.1f} ms" for o in top)
            print(f"  {backend}: {text}")
    failed = sum(1 for _, _, r in results if not r.get("ok"))
    print(f"\nwrote {', '.join(paths)}")
    print(f"{len(results) - failed}/{len(results)} measurements succeeded in "
          f"{time.perf_counter() - started:.1f} s")
    return 0 if failed < len(results) or (not results and caps) else 1
