"""The ``macl-kernels`` console script (also ``python -m macl_kernels``).

Four subcommands, each answering one question a user has before trusting the package:

``info``
    What is installed and which backends can run here (and, for those that cannot, why)?
``verify``
    Does every usable backend agree with the float64 full-matrix reference, loss *and* gradients,
    for every loss and layout, to the tolerances of SPEC.md section 8? Exit status 1 if not, so it
    can gate a CI job or an install script.
``bench``
    How fast, and how much memory, is each backend across batch sizes? (Code in ``_bench.py``:
    every measurement runs in a fresh process so that peak memory is honest on CPU.)
``profile``
    Where do the time and memory of a step go (normalise, forward, backward; top operators from
    torch.profiler), what throughput does each backend reach, and what is the largest batch that
    fits a memory budget? (Code in ``_profile.py``, fresh processes as well.)

Nothing here runs at import time; ``main()`` is the entry point declared in ``setup.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Callable, Dict, Iterable, List, NamedTuple, NoReturn, Optional, Sequence, TextIO

import torch

import macl_kernels as mk

# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def default_device() -> str:
    """The device a user most likely wants to check: the GPU when PyTorch sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), so results say what they ran on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    """Human-readable name of ``device``: the CUDA device name, else the CPU model."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return cpu_model_name()


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]],
                 right_align: Sequence[bool] = ()) -> str:
    """A plain-text table with columns as wide as their widest cell (numbers right-aligned)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    align = list(right_align) + [False] * (len(header) - len(right_align))

    def line(cells):
        return "  ".join(c.rjust(w) if a else c.ljust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def _usage_error(message: str) -> NoReturn:
    """Exit like argparse does on a bad argument: message on stderr, status 2."""
    print(f"macl-kernels: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parse_backends(text: str, device: str, allow_reference: bool = True) -> List[str]:
    """Comma-separated backend names, each checked to be usable (else a clear error)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    available = mk.available_backends(device)
    for name in names:
        if name not in available:
            _usage_error(f"unknown backend {name!r}; choose from {list(available)}")
        if name == "reference" and not allow_reference:
            _usage_error("'reference' is the oracle verify compares against")
        if available[name] is not None:
            _usage_error(f"backend {name!r} is not usable on {device}: {available[name]}")
    return names


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def _triton_version() -> str:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "not installed"
    try:
        import triton

        return getattr(triton, "__version__", "installed (version unknown)")
    except Exception as exc:  # a broken install should be reported, not crash `info`
        return f"installed but not importable ({type(exc).__name__}: {exc})"


def info_lines() -> List[str]:
    """The ``info`` report, one ``key: value`` line each (a list so that tests can inspect it)."""
    lines = [
        f"macl_kernels: {mk.__version__} ({os.path.dirname(os.path.abspath(mk.__file__))})",
        f"python: {platform.python_version()} ({platform.python_implementation()}, "
        f"{sys.executable})",
        f"platform: {platform.platform()}",
        f"torch: {torch.__version__}",
        f"torch CUDA build: {torch.version.cuda or 'none (CPU-only build)'}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("CUDA device: none visible")
    lines.append(f"triton: {_triton_version()}")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = f"{os.cpu_count()}" + (f" ({affinity} usable by this process)"
                                  if affinity is not None and affinity != os.cpu_count() else "")
    lines.append(f"CPU: {cpu_model_name()}, {cpus} logical CPUs, "
                 f"torch threads {torch.get_num_threads()}")
    lines.append("backends:")
    for name, reason in mk.available_backends().items():
        lines.append(f"  {name}: {'usable' if reason is None else 'unusable: ' + reason}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------

LAYOUTS = ("2n", "cross", "cross_sym")
CLIP_SCALE = 1 / 0.07

# SPEC.md section 8: relative error (norm of difference / norm of reference) against the float64
# reference, for loss and gradients. Inputs are rounded to the tested dtype *before* the reference
# sees them, so these bound the backend's arithmetic, not the rounding of the inputs.
DEFAULT_TOLERANCES: Dict[str, float] = {
    "float64": 1e-9,
    "float32": 1e-5,
    "bfloat16": 2e-2,
    "float16": 2e-2,
}
# Backends whose fp32 dot products run in tf32 get SPEC's looser fp32 bound.
BACKEND_TOLERANCES: Dict[tuple, float] = {("triton", "float32"): 1e-3}


class LossCase(NamedTuple):
    """One loss configuration: ``call(z1, z2, layout, backend, logit_scale)`` returns the
    per-anchor loss vector (``reduction="none"``)."""

    name: str
    layouts: tuple
    call: Callable
    uses_logit_scale: bool = False


def _case(name, fn, layouts=LAYOUTS, **kwargs) -> LossCase:
    def call(z1, z2, layout, backend, logit_scale):
        return fn(z1, z2, layout=layout, reduction="none", backend=backend, **kwargs)

    return LossCase(name, layouts, call)


def _clip_call(z1, z2, layout, backend, logit_scale):
    return mk.clip_loss(z1, z2, logit_scale, reduction="none", backend=backend)


LOSS_CASES: List[LossCase] = [
    _case("infonce", mk.infonce_loss, temperature=0.1),
    LossCase("clip", ("cross_sym",), _clip_call, uses_logit_scale=True),
    _case("dcl", mk.dcl_loss, temperature=0.1),
    _case("dclw", mk.dcl_loss, temperature=0.1, weighted=True),
    _case("macl", mk.macl_loss),
    _case("macl-anchor", mk.macl_loss, temperature_mode="anchor"),
    _case("macl-exp", mk.macl_loss, schedule="exp", alpha=2.0),  # the 2022 preprint's rule
    _case("macl-noreweight", mk.macl_loss, reweight=False),
    _case("tfree", mk.tfree_loss),
]


def select_cases(losses: Optional[Sequence[str]]) -> List[LossCase]:
    if losses is None:
        return list(LOSS_CASES)
    by_name = {case.name: case for case in LOSS_CASES}
    unknown = [name for name in losses if name not in by_name]
    if unknown:
        raise ValueError(f"unknown loss configuration(s) {unknown}; choose from {list(by_name)}")
    return [by_name[name] for name in losses]


class VerifyResult(NamedTuple):
    backend: str
    loss: str
    layout: str
    dtype: str
    errors: Dict[str, float]  # "loss", "dz1", "dz2" and, for CLIP, "dscale"
    tolerance: float
    error: Optional[str] = None  # an exception raised by the backend or the reference

    @property
    def ok(self) -> bool:
        # ``err <= tol`` is False for NaN, so a NaN never passes.
        return self.error is None and all(err <= self.tolerance for err in self.errors.values())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute if the reference is 0)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    diff = float(torch.linalg.vector_norm(actual - expected))
    scale = float(torch.linalg.vector_norm(expected))
    return diff / scale if scale > 0 else diff


def _inputs(n: int, d: int, seed: int):
    """Two correlated views with random row norms (exercising normalisation's backward) and
    positives that are more similar than negatives, as in training (MACL's A is not ~0)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen, dtype=torch.float64)
    views = []
    for _ in range(2):
        view = base + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        views.append(view * (0.5 + 2.5 * torch.rand(n, 1, generator=gen, dtype=torch.float64)))
    return views[0], views[1], gen


def _loss_and_grads(case: LossCase, z1, z2, logit_scale, *, layout, backend, upstream):
    """Per-anchor losses and the gradients of ``sum(upstream * loss)`` (a non-unit upstream
    gradient, so that a backend ignoring ``grad_output`` is caught)."""
    leaves = [z1, z2] + ([logit_scale] if case.uses_logit_scale else [])
    loss = case.call(z1, z2, layout, backend, logit_scale)
    grads = torch.autograd.grad(loss, leaves,
                                grad_outputs=upstream.to(device=loss.device, dtype=loss.dtype))
    return loss, dict(zip(["dz1", "dz2", "dscale"], grads))


def _errors(loss, grads, ref_loss, ref_grads) -> Dict[str, float]:
    errors = {"loss": relative_error(loss, ref_loss)}
    errors.update({k: relative_error(grads[k], ref_grads[k]) for k in ref_grads})
    return errors


def _fresh_leaves(*tensors, device="cpu", dtype=None):
    return [t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_()
            for t in tensors]


def verify_cases(n: int = 64, d: int = 32, seed: int = 0,
                 dtypes: Sequence[str] = ("float64", "float32"),
                 backends: Optional[Sequence[str]] = None, device: Optional[str] = None,
                 tolerances: Optional[Dict[str, float]] = None,
                 losses: Optional[Sequence[str]] = None) -> List[VerifyResult]:
    """Compare every (backend, loss, layout, dtype) against the float64 reference on the CPU.

    ``losses`` restricts the check to those names of ``LOSS_CASES`` (default: all);
    ``tolerances`` maps dtype names to relative-error bounds that replace the defaults.
    """
    device = device or default_device()
    cases = select_cases(losses)
    overrides = dict(tolerances or {})  # explicit tolerances win over per-backend defaults
    if backends is None:
        backends = [name for name, reason in mk.available_backends(device).items()
                    if reason is None and name != "reference"]
    results = []
    for backend in backends:
        for dtype_name in dtypes:
            tol = overrides.get(dtype_name, BACKEND_TOLERANCES.get(
                (backend, dtype_name), DEFAULT_TOLERANCES[dtype_name]))
            for case in cases:
                for layout in case.layouts:
                    results.append(_verify_one(backend, case, layout, dtype_name, tol, n, d,
                                               seed, device))
    return results


def _verify_one(backend, case, layout, dtype_name, tol, n, d, seed, device):
    dtype = DTYPES[dtype_name]
    z1_64, z2_64, gen = _inputs(n, d, seed)
    m = n if layout == "cross" else 2 * n
    upstream = torch.randn(m, generator=gen, dtype=torch.float64)
    scale_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    scale_64 = torch.tensor(CLIP_SCALE, dtype=scale_dtype).to(torch.float64)
    # Round the inputs to the tested dtype first; the reference sees exactly those values.
    z1, z2 = (z.to(dtype) for z in (z1_64, z2_64))
    scale = scale_64.to(scale_dtype)
    try:
        ref_loss, ref_grads = _loss_and_grads(
            case, *_fresh_leaves(z1, z2, scale, dtype=torch.float64), layout=layout,
            backend="reference", upstream=upstream)
        loss, grads = _loss_and_grads(case, *_fresh_leaves(z1, z2, scale, device=device),
                                      layout=layout, backend=backend, upstream=upstream)
    except Exception as exc:  # report, keep checking the other cases
        return VerifyResult(backend, case.name, layout, dtype_name, {}, tol,
                            f"{type(exc).__name__}: {exc}")
    return VerifyResult(backend, case.name, layout, dtype_name,
                        _errors(loss, grads, ref_loss, ref_grads), tol)


def format_verify_table(results: Sequence[VerifyResult]) -> str:
    def fmt(values, key):
        return f"{values[key]:.2e}" if key in values else "-"

    header = ["backend", "loss", "layout", "dtype", "loss err", "dz1 err", "dz2 err",
              "dscale err", "tol", "status"]
    rows = []
    for r in results:
        if r.error:
            status = "ERROR: " + r.error
        else:
            status = "ok" if r.ok else "FAIL"
        rows.append([r.backend, r.loss, r.layout, r.dtype, fmt(r.errors, "loss"),
                     fmt(r.errors, "dz1"), fmt(r.errors, "dz2"), fmt(r.errors, "dscale"),
                     f"{r.tolerance:.0e}", status])
    return format_table(header, rows, right_align=[False] * 4 + [True] * 5)


def run_verify(n: int = 64, d: int = 32, seed: int = 0,
               dtypes: Sequence[str] = ("float64", "float32"),
               backends: Optional[Sequence[str]] = None, device: Optional[str] = None,
               tolerances: Optional[Dict[str, float]] = None,
               losses: Optional[Sequence[str]] = None,
               out: Optional[TextIO] = None) -> int:
    """Run :func:`verify_cases`, print the table and a summary; return the exit status
    (0 all within tolerance, 1 any miss or error, 2 nothing to check)."""
    out = out or sys.stdout
    device = device or default_device()
    results = verify_cases(n=n, d=d, seed=seed, dtypes=dtypes, backends=backends,
                           device=device, tolerances=tolerances, losses=losses)
    if not results:
        reasons = {k: v for k, v in mk.available_backends(device).items() if v is not None}
        print(f"verify: no backend other than 'reference' is usable on {device}; "
              f"reasons: {reasons}", file=out)
        return 2
    print(f"verify: N={n}, D={d}, seed={seed}, device={device} ({device_name(device)}), "
          f"against the float64 reference; relative errors, random non-unit upstream gradient",
          file=out)
    print(format_verify_table(results), file=out)
    failed = [r for r in results if not r.ok]
    all_errors = [e for r in results for e in r.errors.values()]
    worst = max((e for e in all_errors if e == e), default=float("nan"))  # e != e: NaN
    nans = sum(1 for e in all_errors if e != e)
    backends_run = sorted({r.backend for r in results})
    print("", file=out)
    print(f"{len(results) - len(failed)}/{len(results)} checks passed "
          f"(backends: {', '.join(backends_run)}; worst finite relative error {worst:.2e}"
          + (f"; {nans} NaN" if nans else "") + ")"
          + (f"; {len(failed)} FAILED" if failed else ""), file=out)
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    backends = None
    if args.backends:
        backends = _parse_backends(args.backends, args.device or default_device(),
                                   allow_reference=False)
    losses = [name.strip() for name in args.losses.split(",")] if args.losses else None
    try:
        select_cases(losses)
    except ValueError as exc:
        _usage_error(str(exc))
    return run_verify(n=args.n, d=args.d, seed=args.seed, dtypes=dtypes, backends=backends,
                      device=args.device, losses=losses)


# --------------------------------------------------------------------------------------------
# bench (implementation in _bench.py)
# --------------------------------------------------------------------------------------------


def _parse_sizes(text: str) -> List[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not sizes or any(s < 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be integers >= 2, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_measurement_arguments(p: argparse.ArgumentParser, timeout_default: float) -> None:
    """The options ``bench`` and ``profile`` share: what to measure, where, and how workers run."""
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="layout (default 2n; cross_sym for clip)")
    p.add_argument("--dim", type=_positive_int, default=128,
                   help="embedding dimension D (default 128)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="input dtype (default float32)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default every usable one, incl. reference)")
    p.add_argument("--device", default=None, help="device (default cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads in each worker (default torch's choice)")
    p.add_argument("--timeout", type=float, default=timeout_default,
                   help=f"seconds before a worker is killed and recorded as failed "
                        f"(default {timeout_default:g})")


def _run_target(args: argparse.Namespace):
    """``bench`` and ``profile``: the device, the backends (default: every usable one) and the
    layout (CLIP: ``cross_sym`` only)."""
    from . import _bench

    device = args.device or default_device()
    backends = (_parse_backends(args.backends, device) if args.backends else
                [name for name, reason in mk.available_backends(device).items() if reason is None])
    layout = args.layout or _bench.default_layout(args.loss)
    if args.loss == "clip" and layout != "cross_sym":
        _usage_error("the CLIP loss has layout 'cross_sym' only")
    return device, backends, layout


def cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    device, backends, layout = _run_target(args)
    sizes = args.sizes or (_bench.QUICK_SIZES if args.quick else _bench.FULL_SIZES)
    repeats = args.repeats or (_bench.QUICK_REPEATS if args.quick else _bench.FULL_REPEATS)
    config = _bench.BenchConfig(loss=args.loss, layout=layout, sizes=sizes, dim=args.dim,
                                dtype=args.dtype, backends=backends, device=device,
                                repeats=repeats, seed=args.seed, threads=args.threads,
                                timeout_s=args.timeout)
    return _bench.run_bench(config, out_dir=args.out, progress=not args.no_progress)


# --------------------------------------------------------------------------------------------
# profile (implementation in _profile.py)
# --------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def cmd_profile(args: argparse.Namespace) -> int:
    from . import _profile

    device, backends, layout = _run_target(args)
    if args.search_max_n < args.search_start:
        _usage_error("--search-max-n must be >= --search-start")
    config = _profile.ProfileConfig(
        loss=args.loss, layout=layout, sizes=args.sizes, dim=args.dim, dtype=args.dtype,
        backends=backends, device=device, repeats=args.repeats, seed=args.seed,
        threads=args.threads, timeout_s=args.timeout, op_profile=not args.no_op_profile,
        budget_gb=args.budget_gb, search_start=args.search_start, search_max_n=args.search_max_n,
        search_time_s=args.search_time)
    return _profile.run_profile(config, out_dir=args.out, progress=not args.no_progress)


# --------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macl-kernels",
        description="Fused MACL and sibling contrastive losses: environment report, "
                    "correctness check against the float64 reference, and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {mk.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="versions, devices and which backends are usable (and why not)",
                       description="Print package, Python, torch, CUDA and Triton versions, CPU "
                                   "details, and for each backend 'usable' or the reason it is "
                                   "not.")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify", help="check every usable backend against the float64 reference",
        description="For every usable backend except 'reference', every loss configuration and "
                    "layout, compare per-anchor losses and gradients (z1, z2, CLIP's logit_scale; "
                    "random non-unit upstream gradient) with the float64 reference. Relative "
                    "error tolerances (SPEC.md section 8): float64 1e-9, float32 1e-5, "
                    "bfloat16/float16 2e-2. Exit status 1 on any miss.")
    p.add_argument("--n", type=_positive_int, default=64, help="rows per view (default 64)")
    p.add_argument("--d", type=_positive_int, default=32, help="embedding dimension (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=[*DTYPES, "all"], default="all",
                   help="input dtype to test (default all)")
    p.add_argument("--device", default=None,
                   help="device for the tested backends (default cuda if available, else cpu)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to check (default every usable one)")
    p.add_argument("--losses", default=None,
                   help="comma-separated loss configurations to check (default all: "
                        + ", ".join(case.name for case in LOSS_CASES) + ")")
    p.set_defaults(func=cmd_verify)

    from . import _bench  # light: heavy imports (matplotlib, tqdm) happen inside its functions

    p = sub.add_parser(
        "bench", help="forward+backward time and peak memory per backend across batch sizes",
        description="Time forward+backward and measure peak extra memory of each backend, each "
                    "(backend, N) in a fresh subprocess. Writes OUT/bench.csv and OUT/bench.png.")
    p.add_argument("--quick", action="store_true",
                   help=f"sizes {','.join(map(str, _bench.QUICK_SIZES))}, "
                        f"{_bench.QUICK_REPEATS} repeats (about a minute on 2 CPU cores)")
    p.add_argument("--out", default=os.path.join("bench", "results", "latest"),
                   help="output directory (default bench/results/latest)")
    p.add_argument("--loss", choices=_bench.BENCH_LOSSES, default="macl",
                   help="loss to benchmark (default macl)")
    p.add_argument("--sizes", type=_parse_sizes, default=None,
                   help=f"comma-separated N, rows per view (default "
                        f"{','.join(map(str, _bench.FULL_SIZES))})")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help=f"timed runs per measurement (default {_bench.FULL_REPEATS}, "
                        f"{_bench.QUICK_REPEATS} with --quick)")
    _add_measurement_arguments(p, _bench.DEFAULT_TIMEOUT_S)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    from . import _profile

    p = sub.add_parser(
        "profile",
        help="per-phase time, peak memory, throughput and the largest batch in a memory budget",
        description="For one loss, batch sizes and backends: time of the normalise, forward and "
                    "backward phases, peak memory of a step (inputs and gradients included), "
                    "throughput in pairs/s, the top operators (torch.profiler), and with "
                    "--budget-gb the largest N each backend fits in that budget (doubling then "
                    "bisecting on measured peak memory, one fresh process per measurement). "
                    "Writes OUT/profile.csv, ops.csv, capacity.csv and profile.png.")
    p.add_argument("--out", default=os.path.join("bench", "results", "profile"),
                   help="output directory (default bench/results/profile)")
    p.add_argument("--loss", choices=_profile.PROFILE_LOSSES, default="macl",
                   help="loss to profile (default macl)")
    p.add_argument("--sizes", type=_parse_sizes, default=list(_profile.DEFAULT_SIZES),
                   help=f"comma-separated N, rows per view (default "
                        f"{','.join(map(str, _profile.DEFAULT_SIZES))})")
    p.add_argument("--repeats", type=_positive_int, default=_profile.DEFAULT_REPEATS,
                   help=f"timed steps per measurement (default {_profile.DEFAULT_REPEATS})")
    _add_measurement_arguments(p, _profile.DEFAULT_TIMEOUT_S)
    p.add_argument("--no-op-profile", action="store_true",
                   help="skip the torch.profiler pass (ops.csv stays empty)")
    p.add_argument("--budget-gb", type=_positive_float, default=None,
                   help="memory budget in GiB: search the largest N per backend that fits "
                        "(default: no search)")
    p.add_argument("--search-start", type=_positive_int, default=_profile.DEFAULT_SEARCH_START,
                   help=f"first N of the search (default {_profile.DEFAULT_SEARCH_START})")
    p.add_argument("--search-max-n", type=_positive_int, default=_profile.DEFAULT_SEARCH_MAX_N,
                   help=f"cap of the search, N rows per view (default "
                        f"{_profile.DEFAULT_SEARCH_MAX_N}, i.e. 2N = "
                        f"{2 * _profile.DEFAULT_SEARCH_MAX_N} anchors in layout 2n)")
    p.add_argument("--search-time", type=_positive_float, default=_profile.DEFAULT_SEARCH_TIME_S,
                   help=f"seconds of search per backend before it stops with what it has "
                        f"(default {_profile.DEFAULT_SEARCH_TIME_S:g})")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_profile)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover - `python -m macl_kernels` goes via __main__.py
    sys.exit(main())
