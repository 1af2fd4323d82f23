"""The roofline of ``bench`` and ``profile``: the useful work of a loss step and this machine's
matmul rate, measured in the same run (``docs/math.md#roofline-useful-work-and-the-matmul-rate``).

* ``useful_macs`` / ``useful_flops``: the one place where the minimum multiply-adds of each
  layout and phase are written down (1 multiply-add = 2 flops). Only the similarity GEMMs count
  (``S`` and the two gradient products); the ``O((M + K) D)`` terms (normalisation, positive
  logits, the logit map) are left out.
* ``measure_matmul_rates``: ``torch.mm`` (CPU) or ``torch.matmul`` (CUDA) in the benchmark's
  dtype, ``A @ B^T`` into a preallocated output (``out=``), for a tile-sized shape (the ``cpu``
  backend's 256 x 256 tile of ``S``) and a whole-matrix shape (``S`` itself, each side capped at
  4096), warm-up then the median of several timed samples. ``bench.run_matmul_worker`` measures
  it in a fresh worker process (``worker.py matmul``) with the same thread count as the
  benchmark's workers. This module imports nothing of the package, so that worker starts without
  the package's backends.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import torch

ROOFLINE_PHASES = ("forward", "backward", "step")
TILE = 256  # the cpu backend's tile of S (BLOCK in csrc/cpu/macl_cpu_kernels.cpp)
WHOLE_CAP = 4096  # each side of the whole-matrix shape is capped here
SAMPLE_S = 0.02  # a timed sample lasts at least this long (the tile GEMM is repeated)
BUDGET_S = 1.5  # timed samples per shape: as many as fit here, 3 to 25
# Products run untimed first for this long: a fresh process on a shared VM runs its first
# fraction of a second slower (measured: 56 GFLOP/s on the first 4096 x 128 x 4096 product,
# 95-100 on the next ones), which a short measurement would take for the machine's rate.
WARMUP_S = 0.5

# Minimum multiply-adds of one loss evaluation, in units of P^2 D where P x P is the similarity
# matrix S (P = M = 2N anchors in layout 2n; P = N in cross and cross_sym). No backend stores S,
# so the backward recomputes it (as every backend does): forward = S; backward = S again plus the
# two gradient products; step = forward + backward. In layout 2n S is symmetric: half of it is
# computed (each tile serves its rows and its columns) and dU = (dL_dS + dL_dS^T) U is one P x P x D
# product. In cross_sym one S serves both directions (row and column statistics, both gradient
# sides), so its minimum equals cross's.
_MACS_PER_P2D: Dict[str, Dict[str, float]] = {
    "2n": {"forward": 0.5, "backward": 0.5 + 1.0, "step": 2.0},
    "cross": {"forward": 1.0, "backward": 1.0 + 2.0, "step": 4.0},
    "cross_sym": {"forward": 1.0, "backward": 1.0 + 2.0, "step": 4.0},
}


def similarity_side(layout: str, n: int) -> int:
    """Side ``P`` of the similarity matrix ``S`` for ``n`` rows per view: ``2n`` for layout
    ``2n`` (``M = 2N`` anchors), ``n`` for ``cross`` and ``cross_sym``."""
    if layout not in _MACS_PER_P2D:
        raise ValueError(f"unknown layout {layout!r}; choose from {list(_MACS_PER_P2D)}")
    return 2 * n if layout == "2n" else n


def useful_macs(layout: str, n: int, d: int, phase: str = "step") -> float:
    """Minimum multiply-adds of ``phase`` (``forward``, ``backward`` or ``step`` = both) of one
    loss in ``layout`` with ``n`` rows per view of dimension ``d``:

    ========== ============ ============= ==============
    layout     forward      backward      step
    ========== ============ ============= ==============
    2n         0.5 M^2 D    1.5 M^2 D     2 M^2 D       (M = 2N)
    cross      N^2 D        3 N^2 D       4 N^2 D
    cross_sym  N^2 D        3 N^2 D       4 N^2 D
    ========== ============ ============= ==============
    """
    if phase not in ROOFLINE_PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose from {list(ROOFLINE_PHASES)}")
    p = similarity_side(layout, n)
    return _MACS_PER_P2D[layout][phase] * float(p) * float(p) * float(d)


def useful_flops(layout: str, n: int, d: int, phase: str = "step") -> float:
    """``2 * useful_macs``: the useful floating-point operations (1 multiply-add = 2 flops)."""
    return 2.0 * useful_macs(layout, n, d, phase)


def fraction(rate: Optional[float], reference_rate: Optional[float]) -> Optional[float]:
    """``rate / reference_rate``; ``None`` when either is missing or the reference is not
    positive."""
    if rate is None or reference_rate is None or reference_rate <= 0:
        return None
    return rate / reference_rate


def matmul_shapes(layout: str, n_max: int, d: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``((P_tile, P_tile), (P_whole, P_whole))``: the output shapes of the tile-sized and the
    whole-matrix GEMM for the largest ``n`` of a sweep (each ``[P, d] @ [d, P]``)."""
    p = similarity_side(layout, n_max)
    tile = min(TILE, p)
    whole = min(WHOLE_CAP, p)
    return (tile, tile), (whole, whole)


def shape_label(rows: int, cols: int, d: int) -> str:
    return f"{rows}x{d} @ {d}x{cols}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul(rows: int, cols: int, d: int, dtype: torch.dtype, device: str = "cpu",
                   seed: int = 0, sample_s: float = SAMPLE_S,
                   budget_s: float = BUDGET_S) -> Dict:
    """GFLOP/s of ``A @ B^T`` (``A [rows, d]``, ``B [cols, d]``) into a preallocated
    ``[rows, cols]`` output in ``dtype``: warm-up, then the median of 3-9 samples, each repeating
    the product until it lasts ``sample_s``."""
    import numpy as np

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, d, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(cols, d, generator=gen).to(device=dev, dtype=dtype)
    bt = b.t()
    out = torch.empty(rows, cols, device=dev, dtype=dtype)
    mm = torch.matmul if dev.type == "cuda" else torch.mm

    def run(reps: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            mm(a, bt, out=out)
        _sync(dev)
        return time.perf_counter() - t0

    run(1)  # warm-up: page in the operands, pick the kernel
    one = max(run(1), 1e-7)
    warmup_s = WARMUP_S * min(1.0, budget_s / BUDGET_S)  # the tests' tiny budgets: tiny warm-up
    run(max(1, int(warmup_s / one)))
    reps = max(1, int(sample_s / one))
    sample = one * reps
    samples = int(min(25, max(3, budget_s / sample)))
    times = [run(reps) / reps for _ in range(samples)]
    median, best = float(np.median(times)), float(min(times))
    flops = 2.0 * rows * cols * d
    # The rate is the best sample, not the median: the ceiling the fractions are taken against
    # should be what the machine can do, and a momentarily slowed sample (other tenants of a
    # shared machine) must not make a loss look closer to it than it is.
    return {"gflops": flops / best / 1e9, "gflops_median": flops / median / 1e9,
            "median_s": median, "best_s": best, "reps": reps, "samples": samples,
            "shape": shape_label(rows, cols, d)}


def measure_matmul_rates(layout: str, n_max: int, d: int, dtype: str, device: str = "cpu",
                         seed: int = 0) -> Dict:
    """The tile-sized and the whole-matrix matmul rate for a sweep whose largest ``n`` is
    ``n_max`` (see ``matmul_shapes``), as one JSON-ready dict."""
    (tr, tc), (wr, wc) = matmul_shapes(layout, n_max, d)
    torch_dtype = getattr(torch, dtype)
    tile = measure_matmul(tr, tc, d, torch_dtype, device, seed)
    whole = measure_matmul(wr, wc, d, torch_dtype, device, seed + 1)
    return {
        "ok": True, "op": "torch.matmul" if torch.device(device).type == "cuda" else "torch.mm",
        "dtype": dtype, "device": device, "torch_threads": torch.get_num_threads(),
        "matmul_gflops": whole["gflops"], "matmul_gflops_median": whole["gflops_median"],
        "matmul_shape": whole["shape"],
        "matmul_samples": whole["samples"],
        "matmul_tile_gflops": tile["gflops"], "matmul_tile_shape": tile["shape"],
        "matmul_tile_samples": tile["samples"], "matmul_tile_reps": tile["reps"],
    }


def describe_rates(rates: Dict) -> str:
    """One header line saying what the matmul rate is and how it was measured."""
    if not rates.get("ok"):
        return f"matmul rate: not measured ({rates.get('error', 'unknown error')})"
    return (f"matmul rate ({rates['op']}, {rates['dtype']}, A @ B^T into a preallocated output, "
            f"best of {rates['matmul_samples']} samples after warm-up, {rates['torch_threads']} "
            f"threads): {rates['matmul_shape']}: {rates['matmul_gflops']:.1f} GFLOP/s (whole "
            f"matrix, the denominator of 'of matmul'); tile {rates['matmul_tile_shape']}: "
            f"{rates['matmul_tile_gflops']:.1f} GFLOP/s")
