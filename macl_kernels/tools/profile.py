"""``macl-kernels profile``: where the time and the memory of one loss step go, per backend.

For a loss, a list of batch sizes and a list of backends it reports

* the **per-phase breakdown** of one training step of the loss: *normalise* (the L2
  normalisation of both views, as the functional layer does it), *forward* (the loss on the unit
  rows, ``normalize=False``) and *backward* (``loss.backward()`` back to the raw embeddings, i.e.
  including normalisation's backward); medians over ``--repeats`` timed steps, the device
  synchronised around each phase;
* the **peak memory** of the step: the peak of the process's memory during one step minus the
  memory before the inputs were created, so it counts the inputs ``z1, z2``, their gradients and
  every temporary of the loss (``peak_bytes``); and the peak extra memory of the forward
  (normalise + forward) and of the backward phase over the memory at the start of each phase.
  On the CPU: the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``, see
  ``_bench.py``); on CUDA: ``torch.cuda.max_memory_allocated``;
* the **throughput**, pairs per second: ``N`` (rows per view, i.e. training samples whose two
  views are compared) divided by the median step time;
* the **roofline**: the useful GFLOP/s of the forward, the backward and the whole step (the minimum
  multiply-adds of ``_roofline.useful_flops`` per phase over the phase's median time; the
  normalisation is not counted as work but its time is in the step's) and each as a fraction of
  this machine's matmul rate, measured in the same run by one more fresh worker
  (``_bench.run_matmul_worker``: the profile's dtype, a whole-matrix and a tile-sized shape);
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

Everything measured runs in fresh subprocesses (``python -m macl_kernels._profile``), one per
(backend, N), as ``macl-kernels bench`` does. Outputs in ``--out``: ``profile.csv``, ``ops.csv``,
``capacity.csv`` and ``profile.png`` (time per phase, memory against N with the budget and the
search's probes, throughput).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import bench as _bench
from . import roofline as _roofline
from .cases import ALL_CASES as LOSS_CASES, CLIP_SCALE
from .._math import normalize
from .report import device_name, format_table
from .. import __version__

PROFILE_LOSSES = ("macl", "infonce", "clip", "dcl", "dclw", "tfree", "siglip", "infonce_labels",
                  "macl_labels", "supcon")
PHASES = ("normalise", "forward", "backward")
DEFAULT_SIZES = (1024, 2048, 4096)
DEFAULT_REPEATS = 3
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_SEARCH_START = 1024
DEFAULT_SEARCH_MAX_N = 32768
DEFAULT_SEARCH_TIME_S = 600.0
DEFAULT_SEARCH_RESOLUTION = 0.0625  # bisect until (miss - fit) <= resolution * fit
TOP_OPS = 8
GIB = 2 ** 30

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


def anchors_of(layout: str, n: int) -> int:
    """Anchor rows of one step: ``2N`` for ``2n`` and ``cross_sym``, ``N`` for ``cross``."""
    return n if layout == "cross" else 2 * n


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


class PhasedStep:
    """One training step of the loss split into its phases, on fixed leaves ``z1, z2``."""

    def __init__(self, loss: str, layout: str, backend: str, z1: torch.Tensor,
                 z2: torch.Tensor):
        self.leaves = [z1, z2]
        self.z1, self.z2 = z1, z2
        self._normalize = normalize
        case = LOSS_CASES[loss]
        scale = CLIP_SCALE
        if case.uses_logit_scale:
            scale_dtype = z1.dtype if z1.dtype in (torch.float32, torch.float64) else torch.float32
            scale = torch.tensor(CLIP_SCALE, dtype=scale_dtype, device=z1.device,
                                 requires_grad=True)
            self.leaves.append(scale)
        self._loss = lambda u1, u2: case.call(u1, u2, layout, logit_scale=scale,
                                              backend=backend, validate=False, normalize=False)

    def zero_grad(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def normalise(self):
        return self._normalize(self.z1), self._normalize(self.z2)

    def forward(self, units) -> torch.Tensor:
        return self._loss(*units)

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    def __call__(self) -> None:
        self.zero_grad()
        self.backward(self.forward(self.normalise()))


class _Memory:
    """Peak-memory probe of this process: RSS (CPU) or the caching allocator (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.method = "cuda_max_allocated" if self.cuda else "VmHWM"
        self.was_reset = True

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return _bench.current_rss_bytes()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.was_reset = _bench.reset_peak_rss() and self.was_reset

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        value, method = _bench.peak_rss_bytes()
        if method != "VmHWM":
            self.method = method
        return value

    def describe(self) -> str:
        return self.method + ("" if self.was_reset else " (not reset: includes earlier peaks)")


def _sync(device: torch.device) -> None:
    _bench._synchronize(device)


def _limit_memory(device: torch.device, budget_bytes: Optional[int]) -> Optional[str]:
    """Cap this process at its current footprint plus 1.25 x the budget, so that a probe far
    beyond the budget fails with an allocation error here instead of pressing the machine."""
    if not budget_bytes:
        return None
    slack = int(1.25 * budget_bytes) + 512 * 2 ** 20
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (torch.cuda.memory_allocated(device) + slack) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return f"cuda memory fraction {fraction:.3f}"
    try:
        import resource

        with open("/proc/self/status") as f:
            vm_size = next(int(line.split()[1]) * 1024 for line in f
                           if line.startswith("VmSize:"))
        limit = vm_size + slack
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        return f"RLIMIT_AS {limit / GIB:.2f} GiB"
    except (OSError, ValueError, StopIteration, ImportError):
        return None


def _op_table(prof, device: torch.device, top: int = TOP_OPS) -> List[Dict]:
    """Top operators by self time, per phase (the ``record_function`` range they ran under)."""
    use_cuda = device.type == "cuda"
    rows = []
    events = prof.events()
    # Map each event to the phase whose range encloses it on the same thread (CPU time line).
    ranges = [(e.name, e.time_range.start, e.time_range.end, e.thread) for e in events
              if e.name in PHASES]
    totals: Dict[Tuple[str, str], List[float]] = {}
    for e in events:
        if e.name in PHASES:
            continue
        phase = next((name for name, start, end, thread in ranges
                      if start <= e.time_range.start <= end), "other")
        self_us = (e.self_device_time_total if use_cuda else e.self_cpu_time_total)
        if self_us <= 0:
            continue
        acc = totals.setdefault((phase, e.name), [0.0, 0])
        acc[0] += self_us / 1e3
        acc[1] += 1
    for phase in PHASES + ("other",):
        ops = sorted(((name, v) for (p, name), v in totals.items() if p == phase),
                     key=lambda item: -item[1][0])[:top]
        for rank, (name, (ms, calls)) in enumerate(ops, 1):
            rows.append({"phase": phase, "rank": rank, "op": name, "self_ms": ms,
                         "calls": calls})
    return rows


def measure_profile(loss: str, layout: str, backend: str, n: int, dim: int, dtype: str,
                    device: str, repeats: int, seed: int = 0, op_profile: bool = True,
                    budget_bytes: Optional[int] = None, probe: bool = False) -> Dict:
    """One (backend, N) in this process: memory of one step, then (unless ``probe``) the
    timed phases and a torch.profiler pass."""
    import numpy as np

    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    # Page in code and kernels on a small problem first.
    PhasedStep(loss, layout, backend,
               *_bench.make_inputs(_bench.WARMUP_N, dim, torch_dtype, dev, seed + 1))()
    gc.collect()
    limit = _limit_memory(dev, budget_bytes) if probe else None
    mem = _Memory(dev)

    _sync(dev)
    mem.reset_peak()
    base = mem.current()
    z1, z2 = _bench.make_inputs(n, dim, torch_dtype, dev, seed)
    step = PhasedStep(loss, layout, backend, z1, z2)
    _sync(dev)
    start_fwd = mem.current()
    mem.reset_peak()
    units = step.normalise()
    out = step.forward(units)
    _sync(dev)
    fwd_peak = mem.peak()
    start_bwd = mem.current()
    mem.reset_peak()
    step.backward(out)
    _sync(dev)
    bwd_peak = mem.peak()
    del out, units
    peak_bytes = max(fwd_peak, bwd_peak) - base
    result = {
        "ok": True, "loss": loss, "layout": layout, "backend": backend, "N": n,
        "anchors": anchors_of(layout, n), "D": dim, "dtype": dtype, "device": device,
        "peak_bytes": int(max(0, peak_bytes)),
        "forward_peak_extra_bytes": int(max(0, fwd_peak - start_fwd)),
        "backward_peak_extra_bytes": int(max(0, bwd_peak - start_bwd)),
        "baseline_bytes": int(base), "memory_method": mem.describe(),
        "torch_threads": torch.get_num_threads(), "memory_limit": limit,
    }
    if probe:
        return result

    phase_times = {p: [] for p in PHASES}
    for _ in range(repeats):
        step.zero_grad()
        _sync(dev)
        t0 = time.perf_counter()
        units = step.normalise()
        _sync(dev)
        t1 = time.perf_counter()
        out = step.forward(units)
        _sync(dev)
        t2 = time.perf_counter()
        step.backward(out)
        _sync(dev)
        t3 = time.perf_counter()
        for p, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
            phase_times[p].append(dt)
        del out, units
    med = {p: float(np.median(v)) for p, v in phase_times.items()}
    step_times = [sum(v) for v in zip(*phase_times.values())]
    step_s = float(np.median(step_times))
    result.update({
        "repeats": repeats, **{f"{p}_ms": 1e3 * med[p] for p in PHASES},
        "step_ms": 1e3 * step_s, "pairs_per_s": n / step_s if step_s > 0 else None,
        "step_times_s": step_times,
    })
    if op_profile:
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if dev.type == "cuda" else [])
        step.zero_grad()
        with profile(activities=activities) as prof:
            with record_function("normalise"):
                units = step.normalise()
            with record_function("forward"):
                out = step.forward(units)
            with record_function("backward"):
                step.backward(out)
            _sync(dev)
        result["ops"] = _op_table(prof, dev)
    return result


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m macl_kernels._profile",
        description="One profile measurement (internal: started by `macl-kernels profile`); "
                    "prints one JSON line.")
    _bench.add_worker_arguments(p, PROFILE_LOSSES, repeats_required=False)
    p.add_argument("--no-op-profile", action="store_true")
    p.add_argument("--probe", action="store_true", help="memory of one step only")
    p.add_argument("--budget-bytes", type=int, default=None)
    return p


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    args = _worker_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure_profile(args.loss, args.layout, args.backend, args.n, args.dim,
                                 args.dtype, args.device, args.repeats, args.seed,
                                 op_profile=not args.no_op_profile,
                                 budget_bytes=args.budget_bytes, probe=args.probe)
    except (Exception, MemoryError) as exc:  # out of memory is a result, not a traceback
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}),
              flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def run_worker(config: ProfileConfig, backend: str, n: int, probe: bool = False,
               timeout_s: Optional[float] = None) -> Dict:
    """One measurement in a fresh interpreter; failures come back as ``{"ok": False}``."""
    cmd = _bench.worker_command("macl_kernels._profile", config, backend, n)
    if not config.op_profile:
        cmd.append("--no-op-profile")
    if probe:
        cmd.append("--probe")
        if config.budget_gb:
            cmd += ["--budget-bytes", str(int(config.budget_gb * GIB))]
    return _bench.run_worker_process(cmd, config.timeout_s if timeout_s is None else timeout_s,
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


def write_csv(path: str, columns: Sequence[str], rows: Sequence[Dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


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


if __name__ == "__main__":
    sys.exit(worker_main())
