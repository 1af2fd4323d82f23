"""The worker of ``bench``, ``profile`` and the roofline: one measurement in a fresh process.

Why a fresh process per measurement: on the CPU the only honest memory counter is the process's
resident set, and a process's peak never goes down. Measuring several configurations in one
process would report the largest earlier peak for every later one, and even the import of torch
leaves a transient peak far above the steady state. So the parents (``bench.run_bench``,
``profile.run_profile``, ``bench/compare_trees.py``) start this module once per measurement and
read the one JSON line it prints (``run_worker_process``). Three kinds:

* ``python -m macl_kernels.tools.worker bench --loss L --layout X --backend B --n N --dim D
  --dtype T --repeats R`` (``measure``): one small warm-up at ``N = 64``; the peak extra memory
  of one forward+backward (CPU: the peak RSS, ``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``, minus the RSS before; CUDA: ``max_memory_allocated`` after
  ``reset_peak_memory_stats`` minus the memory allocated before); then ``R`` more steps timed
  with ``time.perf_counter`` (the device synchronised around each).
* ``python -m macl_kernels.tools.worker profile ...`` (``measure_profile``): the same step in its
  phases (normalise, forward, backward), their times and peak memories, ``torch.profiler``'s top
  operators; ``--probe`` measures the memory of one step only (the capacity search), with the
  process capped at ``--budget-bytes`` plus slack.
* ``python .../macl_kernels/tools/worker.py matmul --layout X --n-max N --dim D --dtype T``
  (``roofline.measure_matmul_rates``): this machine's matmul rate. Run as a file, not with
  ``-m``: it needs torch and ``roofline.py`` only, and skipping the package's import (its
  backends) saves seconds per run.

The peak RSS is read from ``VmHWM`` in ``/proc/self/status``, not ``ru_maxrss``: after
``vfork``+``exec`` (how ``subprocess`` starts the worker) Linux seeds the child's ``ru_maxrss``
with the *parent's* peak RSS, and resetting the high-water mark does not clear that, so
``ru_maxrss`` would report the parent's memory. ``ru_maxrss`` is the fallback where ``/proc``
is missing, and the method used is recorded with every result.

The one step every measurement times is ``LossStep`` (``make_step``): a registry case
(``cases.ALL_CASES``) on fixed leaves ``z1, z2`` and, for the cases with a logit scale (CLIP,
SigLIP), a leaf scalar scale, so that its gradient is part of the step as in training. The
pytest-benchmark micro-benchmarks (``bench/bench_micro.py``) and ``bench/compare_trees.py`` time
the same step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__" and not __package__:
    # Run as a file (the matmul worker): Python put this folder first on the path, where
    # ``profile.py`` would shadow the standard library's ``profile`` module.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import torch  # noqa: E402

KINDS = ("bench", "profile", "matmul")
WARMUP_N = 64  # the warm-up step's N: pages in code and kernels before anything is measured
PHASES = ("normalise", "forward", "backward")
TOP_OPS = 8
GIB = 2 ** 30
ERROR_CHARS = 300  # an error is reported as data, its message cut here


# --------------------------------------------------------------------------------------------
# The step: one training step of a registry case, with a leaf logit scale where it has one
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The losses compute in float32, or float64 for float64 inputs (half inputs are upcast).
    return torch.float64 if dtype == torch.float64 else torch.float32


class LossStep:
    """One forward+backward of the registry case ``loss`` (mean reduction) in ``layout`` on the
    fixed leaves ``z1, z2``.

    Cases with a logit scale (``uses_logit_scale``) get a leaf scalar ``logit_scale`` at
    ``CLIP_SCALE`` (float32, float64 for float64 inputs), whose gradient the step computes as a
    training step does. ``validate=False``, as in a training loop: the finiteness check is a host
    synchronisation and would be timed as well. Gradients are dropped before each step so that
    every step allocates them afresh, like ``optimizer.zero_grad(set_to_none=True)``. With
    ``synchronize`` the step waits for the device at its end (the micro-benchmarks time it from
    the host).

    ``step()`` runs the loss with its own normalisation; the profile times the same step in
    phases: ``normalise()`` (``torch.nn.functional.normalize`` in the compute dtype: the values
    the losses' own normalisation computes), ``forward(units)`` (the loss on the unit rows,
    ``normalize=False``) and ``backward(loss)``.
    """

    def __init__(self, loss: str, layout: str, backend: str, z1: torch.Tensor,
                 z2: torch.Tensor, *, synchronize: bool = False):
        from .cases import ALL_CASES, CLIP_SCALE

        if loss not in ALL_CASES:
            raise ValueError(f"loss: unknown loss case {loss!r}; choose from {list(ALL_CASES)}")
        self.case = ALL_CASES[loss]
        self.layout, self.backend = layout, backend
        self.z1, self.z2 = z1, z2
        self.leaves: List[torch.Tensor] = [z1, z2]
        self.logit_scale = CLIP_SCALE
        if self.case.uses_logit_scale:
            self.logit_scale = torch.tensor(CLIP_SCALE, dtype=_compute_dtype(z1.dtype),
                                            device=z1.device, requires_grad=True)
            self.leaves.append(self.logit_scale)
        self.synchronize = synchronize

    def loss(self, u1: torch.Tensor, u2: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.case.call(u1, u2, self.layout, logit_scale=self.logit_scale,
                              backend=self.backend, validate=False,
                              **({} if normalize else {"normalize": False}))

    def zero_grad(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def normalise(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.nn.functional.normalize(z.to(_compute_dtype(z.dtype)), p=2.0, dim=1)
                     for z in (self.z1, self.z2))

    def forward(self, units) -> torch.Tensor:
        return self.loss(*units, normalize=False)

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    def __call__(self) -> None:
        self.zero_grad()
        self.loss(self.z1, self.z2).backward()
        if self.synchronize:
            synchronize(self.z1.device)


def make_step(loss: str, layout: str, backend: str, z1: torch.Tensor, z2: torch.Tensor,
              **options) -> LossStep:
    """``LossStep(loss, layout, backend, z1, z2, **options)``: the one step builder."""
    return LossStep(loss, layout, backend, z1, z2, **options)


def make_inputs(n: int, dim: int, dtype: torch.dtype, device: torch.device,
                seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``z1, z2 = randn(n, dim)`` (seeded on the CPU, then moved), leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    z1, z2 = (torch.randn(n, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
              for _ in range(2))
    return z1, z2


# --------------------------------------------------------------------------------------------
# Memory of this process
# --------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size now: resident pages (``/proc/self/statm``) times the page size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); ``False`` where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Tuple[int, str]:
    """Peak RSS of this process and how it was read (see the module docstring for why
    ``VmHWM`` comes first)."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024, "VmHWM"
    except OSError:
        pass
    import resource  # Unix only, hence imported here

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """Peak-memory probe of this process: RSS (CPU) or the caching allocator (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.method = "cuda_max_allocated" if self.cuda else "VmHWM"
        self.was_reset = True

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return current_rss_bytes()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.was_reset = reset_peak_rss() and self.was_reset

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        value, method = peak_rss_bytes()
        if method != "VmHWM":
            self.method = method
        return value

    def describe(self) -> str:
        return self.method + ("" if self.was_reset else " (not reset: includes earlier peaks)")


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------


def measure(loss: str, layout: str, backend: str, n: int, dim: int, dtype: str, device: str,
            repeats: int, seed: int = 0, warmup_n: int = WARMUP_N) -> Dict:
    """``bench``: peak extra memory of one forward+backward and the times of ``repeats`` more."""
    import numpy as np

    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    z1, z2 = make_inputs(n, dim, torch_dtype, dev, seed)
    step = make_step(loss, layout, backend, z1, z2)
    make_step(loss, layout, backend, *make_inputs(warmup_n, dim, torch_dtype, dev, seed + 1))()
    gc.collect()

    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        synchronize(dev)
        peak_extra, method = torch.cuda.max_memory_allocated(dev) - before, "cuda_max_allocated"
    else:
        was_reset = reset_peak_rss()
        before = current_rss_bytes()
        step()
        peak, method = peak_rss_bytes()
        peak_extra = peak - before
        if not was_reset:
            method += " (not reset: includes earlier peaks)"

    times = []
    for _ in range(repeats):
        synchronize(dev)
        t0 = time.perf_counter()
        step()
        synchronize(dev)
        times.append(time.perf_counter() - t0)
    p20, p50, p80 = (float(v) for v in np.percentile(times, [20, 50, 80]))
    return {
        "ok": True, "loss": loss, "layout": layout, "backend": backend, "N": n, "D": dim,
        "dtype": dtype, "device": device, "repeats": repeats, "times_s": times,
        "p20_s": p20, "median_s": p50, "p80_s": p80,
        "peak_extra_bytes": int(max(0, peak_extra)), "baseline_bytes": int(before),
        "memory_method": method, "torch_threads": torch.get_num_threads(),
    }


def anchors_of(layout: str, n: int) -> int:
    """Anchor rows of one step: ``2N`` for ``2n`` and ``cross_sym``, ``N`` for ``cross``."""
    return n if layout == "cross" else 2 * n


def limit_memory(device: torch.device, budget_bytes: Optional[int]) -> Optional[str]:
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


def op_table(prof, device: torch.device, top: int = TOP_OPS) -> List[Dict]:
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
    """``profile``: one (backend, N) in this process: memory of one step, then (unless
    ``probe``) the timed phases and a torch.profiler pass."""
    import numpy as np

    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    # Page in code and kernels on a small problem first (the whole step, its phases alike).
    warm = make_step(loss, layout, backend, *make_inputs(WARMUP_N, dim, torch_dtype, dev,
                                                         seed + 1))
    warm.zero_grad()
    warm.backward(warm.forward(warm.normalise()))
    del warm
    gc.collect()
    limit = limit_memory(dev, budget_bytes) if probe else None
    mem = Memory(dev)

    synchronize(dev)
    mem.reset_peak()
    base = mem.current()
    z1, z2 = make_inputs(n, dim, torch_dtype, dev, seed)
    step = make_step(loss, layout, backend, z1, z2)
    synchronize(dev)
    start_fwd = mem.current()
    mem.reset_peak()
    units = step.normalise()
    out = step.forward(units)
    synchronize(dev)
    fwd_peak = mem.peak()
    start_bwd = mem.current()
    mem.reset_peak()
    step.backward(out)
    synchronize(dev)
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
        synchronize(dev)
        t0 = time.perf_counter()
        units = step.normalise()
        synchronize(dev)
        t1 = time.perf_counter()
        out = step.forward(units)
        synchronize(dev)
        t2 = time.perf_counter()
        step.backward(out)
        synchronize(dev)
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
            synchronize(dev)
        result["ops"] = op_table(prof, dev)
    return result


def _roofline():
    """``roofline.py``: the package's module, or, run as a file (the matmul worker), the file
    loaded on its own (it imports nothing of the package)."""
    if __package__:
        from . import roofline

        return roofline
    import importlib.util

    spec = importlib.util.spec_from_file_location("macl_kernels_roofline",
                                                  os.path.join(HERE, "roofline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# The entry point (this process) and its parent side (running it)
# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m macl_kernels.tools.worker",
        description="One measurement in this process (internal: started by `macl-kernels bench` "
                    "and `profile` and by bench/compare_trees.py); prints one JSON line.")
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind in ("bench", "profile"):
        k = kinds.add_parser(kind)
        k.add_argument("--loss", required=True)
        k.add_argument("--layout", required=True)
        k.add_argument("--backend", required=True)
        k.add_argument("--n", type=int, required=True)
        k.add_argument("--dim", type=int, required=True)
        k.add_argument("--dtype", required=True)
        k.add_argument("--device", default="cpu")
        k.add_argument("--repeats", type=int, required=kind == "bench", default=1)
        k.add_argument("--seed", type=int, default=0)
        k.add_argument("--threads", type=int, default=None)
        if kind == "profile":
            k.add_argument("--no-op-profile", action="store_true")
            k.add_argument("--probe", action="store_true", help="memory of one step only")
            k.add_argument("--budget-bytes", type=int, default=None)
    k = kinds.add_parser("matmul")
    k.add_argument("--layout", required=True)
    k.add_argument("--n-max", type=int, required=True)
    k.add_argument("--dim", type=int, required=True)
    k.add_argument("--dtype", required=True)
    k.add_argument("--device", default="cpu")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--threads", type=int, default=None)
    return p


def run(args: argparse.Namespace) -> Dict:
    """The measurement ``args`` asks for (``args.kind``), as a JSON-ready dict."""
    if args.kind == "bench":
        return measure(args.loss, args.layout, args.backend, args.n, args.dim, args.dtype,
                       args.device, args.repeats, args.seed)
    if args.kind == "profile":
        return measure_profile(args.loss, args.layout, args.backend, args.n, args.dim,
                               args.dtype, args.device, args.repeats, args.seed,
                               op_profile=not args.no_op_profile,
                               budget_bytes=args.budget_bytes, probe=args.probe)
    return _roofline().measure_matmul_rates(args.layout, args.n_max, args.dim, args.dtype,
                                            args.device, args.seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except Exception as exc:  # e.g. out of memory: a result, reported as data, not a traceback
        print(json.dumps({"ok": False,
                          "error": f"{type(exc).__name__}: {str(exc)[:ERROR_CHARS]}"}),
              flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


def package_root() -> str:
    """The directory above the package (a worker must import this very package)."""
    return os.path.dirname(os.path.dirname(HERE))


def command(kind: str, options: Sequence[str]) -> List[str]:
    """The command line of one worker of ``kind`` with ``options`` (its arguments): ``python -m
    macl_kernels.tools.worker KIND ...``; the matmul worker runs this file as a script (see the
    module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind: unknown worker kind {kind!r}; choose from {list(KINDS)}")
    if kind == "matmul":
        return [sys.executable, os.path.join(HERE, "worker.py"), kind, *options]
    return [sys.executable, "-m", "macl_kernels.tools.worker", kind, *options]


def run_worker_process(cmd: Sequence[str], timeout_s: float,
                       oom_signals: Sequence[str] = ("SIGKILL",)) -> Dict:
    """Run a worker in a fresh interpreter and return the JSON line it prints; failures (time
    out, a signal, an error exit) come back as ``{"ok": False, "error": ...}``."""
    env = dict(os.environ)
    # The worker must import this very package, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        hint = " (likely out of memory)" if sig in oom_signals else ""
        return {"ok": False, "error": f"worker killed by {sig}{hint}"}
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"worker exited with status {proc.returncode}: {last[:300]}"}


if __name__ == "__main__":
    sys.exit(main())
