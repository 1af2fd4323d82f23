"""The ``macl-kernels`` console script (also ``python -m macl_kernels``).

Five subcommands, each answering one question a user has before trusting the package:

``info``
    What is installed and which backends can run here (and, for those that cannot, why)? What
    each computes, and whether a native one is built, buildable on first use, or missing.
``verify``
    Does every usable backend agree with the float64 full-matrix reference, loss *and* gradients,
    for every loss and layout, to the tolerances of docs/math.md#tolerances? Exit status 1 if
    not, so it can gate a CI job or an install script. (Code in ``_verify.py``.)
``bench``
    How fast, and how much memory, is each backend across batch sizes? (Code in ``bench.py``
    and ``worker.py``: every measurement runs in a fresh process so that peak memory is honest
    on CPU.)
``profile``
    Where do the time and memory of a step go (normalise, forward, backward; top operators from
    torch.profiler), what throughput does each backend reach, and what is the largest batch that
    fits a memory budget? (Code in ``profile.py``, fresh processes as well.)
``kernels``
    Would the Triton kernels run well on an H100/H200 (or an A100)? Compiles, without a GPU,
    every configuration the GPU shape rules can launch and reports registers, spill and shared
    memory per configuration; exit status 1 if one breaks the rules. (Code in ``inventory.py``.)

Nothing here runs at import time; ``main()`` is the entry point declared in ``setup.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, NoReturn, Optional, Sequence

from . import bench as _bench
from . import profile as _profile
from . import verify as _verify
from .cases import ALL_CASES as LOSS_CASES, DTYPES, select_cases
from .report import default_device, info_lines
from ..functional import LAYOUTS
from .. import __version__
from ..primitive.backends import available_backends

# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

def _usage_error(message: str) -> NoReturn:
    """Exit like argparse does on a bad argument: message on stderr, status 2."""
    print(f"macl-kernels: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parse_backends(text: str, device: str, allow_reference: bool = True) -> List[str]:
    """Comma-separated backend names, each checked to be usable (else a clear error)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    available = available_backends(device)
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


def cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------

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
    return _verify.run_verify(n=args.n, d=args.d, seed=args.seed, dtypes=dtypes, backends=backends,
                      device=args.device, losses=losses)


# --------------------------------------------------------------------------------------------
# bench (implementation in bench.py)
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
    device = args.device or default_device()
    backends = (_parse_backends(args.backends, device) if args.backends else
                [name for name, reason in available_backends(device).items() if reason is None])
    layout = args.layout or _bench.default_layout(args.loss)
    if args.loss == "clip" and layout != "cross_sym":
        _usage_error("the CLIP loss has layout 'cross_sym' only")
    if args.loss == "siglip" and layout != "cross":
        _usage_error("the SigLIP loss has layout 'cross' only (the images are the anchors)")
    return device, backends, layout


def cmd_bench(args: argparse.Namespace) -> int:
    device, backends, layout = _run_target(args)
    sizes = args.sizes or (_bench.QUICK_SIZES if args.quick else _bench.FULL_SIZES)
    repeats = args.repeats or (_bench.QUICK_REPEATS if args.quick else _bench.FULL_REPEATS)
    config = _bench.BenchConfig(loss=args.loss, layout=layout, sizes=sizes, dim=args.dim,
                                dtype=args.dtype, backends=backends, device=device,
                                repeats=repeats, seed=args.seed, threads=args.threads,
                                timeout_s=args.timeout)
    return _bench.run_bench(config, out_dir=args.out, progress=not args.no_progress)


# --------------------------------------------------------------------------------------------
# profile (implementation in profile.py)
# --------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def cmd_profile(args: argparse.Namespace) -> int:
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
# kernels (implementation in inventory.py)
# --------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """Whether Triton kernels in this process are (or would be) decorated for the interpreter."""
    module = sys.modules.get("macl_kernels.primitive.backends.triton")  # imported: decorated
    return os.environ.get("TRITON_INTERPRET") == "1" or bool(getattr(module, "INTERPRET", False))


def _comma_list(choices: Sequence, convert=str):
    def parse(text: str):
        try:
            values = [convert(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(map(str, choices))}")
        return values
    return parse


def cmd_kernels(args: argparse.Namespace) -> int:
    if _interpreted():
        # Kernels decorated for the interpreter cannot be compiled: run again without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "macl_kernels", "kernels", *args.argv],
                              env=env).returncode
    try:
        import triton  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        _usage_error(f"compiling the Triton kernels needs triton with its NVIDIA backend "
                     f"({type(exc).__name__}: {exc})")
    from . import inventory as _inventory
    from .report import format_table

    rows = _inventory.plan(args.arch, args.precisions, args.widths, args.kernels,
                           candidates=not args.no_candidates, flag_sets=args.flag_sets)
    compiled = sum(r["role"] != "refused" for r in rows)
    print(f"compiling {compiled} configurations for {args.arch} ({args.jobs} job(s))",
          flush=True)

    def progress(row):
        if not args.quiet and row["role"] != "refused":
            print(f"  {row['kernel']:<10} {row['precision']:<9} D<={row['block_d']:<4} "
                  f"{row['flags']:<13} {row['block_m']}x{row['block_n']} "
                  f"{row['num_warps']}w {row['num_stages']}s: regs {row.get('registers', '?')}, "
                  f"spill {row.get('spill_bytes', '?')} B, shared {row.get('shared_bytes', '?')} B"
                  f"{'' if row['ok'] else '  <-- ' + row['problem']}", flush=True)

    rows = _inventory.run(rows, jobs=args.jobs, progress=progress)
    if args.csv:
        _inventory.write_csv(rows, args.csv)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(_inventory.markdown(rows))
    table = [(s["precision"], s["block_d"], s["configs"], s["worst_spill"], s["worst_shared"],
              "refused" if s["refused"] and not s["configs"] else "", s["failures"])
             for s in _inventory.summary(rows)]
    print(format_table(("precision", "BLOCK_D", "configs", "worst spill B", "worst shared B",
                        "width", "failing"), table, (False, True, True, True, True, False, True)))
    failing = [r for r in rows if not r["ok"]]
    for r in failing:
        print(f"FAIL {r['kernel']} {r['precision']} BLOCK_D={r['block_d']} {r['flags']} "
              f"{r['block_m']}x{r['block_n']} {r['num_warps']}w {r['num_stages']}s: "
              f"{r['problem']}")
    return 1 if failing else 0


# --------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macl-kernels",
        description="Fused MACL and sibling contrastive losses: environment report, "
                    "correctness check against the float64 reference, and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="versions, devices and which backends are usable (and why not)",
                       description="Print package, Python, torch, CUDA and Triton versions, CPU "
                                   "details, and for each backend 'usable' or the reasons it is "
                                   "not, what it computes (its capabilities) and, for a native "
                                   "backend, whether its extension is built, buildable on first "
                                   "use, or missing and why.")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify", help="check every usable backend against the float64 reference",
        description="For every usable backend except 'reference', every loss configuration and "
                    "layout, compare per-anchor losses and gradients (z1, z2, CLIP's logit_scale; "
                    "random non-unit upstream gradient) with the float64 reference. Relative "
                    "error tolerances (docs/math.md#tolerances): float64 1e-10, float32 1e-5 "
                    "(1e-3 where float32 dots may run in tf32), bfloat16/float16 2e-2. Exit "
                    "status 1 on any miss.")
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
                        + ", ".join(LOSS_CASES) + ")")
    p.set_defaults(func=cmd_verify)

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

    from . import inventory as _inventory
    from ..primitive.backends.triton import PRECISIONS

    p = sub.add_parser(
        "kernels", help="compile the Triton kernels for a GPU architecture (no GPU needed) and "
                        "report registers, spill and shared memory",
        description="Compile, with Triton's bundled ptxas and no GPU, the tile shape the GPU "
                    "shape rules choose for every kernel, precision, width (BLOCK_D) and flag "
                    "set, plus the autotune candidates that survive pruning; report registers, "
                    "spill bytes and shared memory per configuration. Exit status 1 when one "
                    f"spills more than {_inventory.MAX_SPILL_BYTES} B per thread, exceeds the "
                    "architecture's shared memory or the figure the shape table records for "
                    "it, or multiplies row offsets in 32 bits.")
    p.add_argument("--arch", choices=list(_inventory.ARCHS), default="sm_90",
                   help="target architecture (default sm_90: H100/H200)")
    p.add_argument("--csv", default=None, help="write every configuration to this CSV file")
    p.add_argument("--md", default=None, help="write the summary and rows as Markdown")
    p.add_argument("--precisions", type=_comma_list(list(PRECISIONS)), default=list(PRECISIONS),
                   help=f"comma-separated precision classes (default all: "
                        f"{','.join(PRECISIONS)})")
    p.add_argument("--widths", type=_comma_list(_inventory.WIDTHS, int),
                   default=list(_inventory.WIDTHS),
                   help=f"comma-separated BLOCK_D values (default "
                        f"{','.join(map(str, _inventory.WIDTHS))})")
    p.add_argument("--kernels", type=_comma_list(_kernel_names()), default=None,
                   help="comma-separated kernels of the table (default all: "
                        f"{','.join(_kernel_names())})")
    p.add_argument("--no-candidates", action="store_true",
                   help="only the default shape (AUTOTUNE off), not the autotune candidates")
    p.add_argument("--flag-sets", choices=("all", "heaviest"), default="all",
                   help="every flag set each kernel is launched with, or only its heaviest")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="compile in this many processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no line per configuration")
    p.set_defaults(func=cmd_kernels)
    return parser


def _kernel_names() -> List[str]:
    from ..primitive.backends import triton as triton_backend

    return list(triton_backend.KERNELS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[argv.index("kernels") + 1:] if "kernels" in argv else []
    try:
        return args.func(args)
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover - `python -m macl_kernels` goes via __main__.py
    sys.exit(main())
