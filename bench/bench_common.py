"""Shared set-up of the pytest-benchmark micro-benchmarks (``bench/bench_*.py``).

Not tests: nothing asserts a time, and ``make test`` (``pytest -q tests``) never collects this
folder. Run them with

    python -m pytest bench/bench_{macl,infonce,clip,dcl,tfree}.py --benchmark-json=bench/results/micro.json
    python bench/plot_micro.py bench/results/micro.json --out bench/results/micro.png

Every benchmark times one forward+backward of a loss (``reduction="mean"``, ``validate=False``
as in a training loop) on fixed random ``[N, D]`` leaves, for every usable backend and every
size. Environment knobs (all optional):

``MACL_BENCH_SIZES``   comma-separated N, rows per view (default ``256,1024,2048``)
``MACL_BENCH_DIM``     embedding dimension D (default 128)
``MACL_BENCH_DTYPE``   float32 (default), float64, bfloat16, float16
``MACL_BENCH_DEVICE``  cpu or cuda (default cuda when available)
``MACL_BENCH_ROUNDS``  timed rounds per benchmark (default 5; one warm-up round before)
``MACL_BENCH_BACKENDS`` comma-separated backends (default every usable one, incl. reference)
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List

import torch

try:
    import macl_kernels as mk
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import macl_kernels as mk

from macl_kernels.tools.cases import CLIP_SCALE, LOSS_CASES


def _env_list(name: str, default: str) -> List[str]:
    return [s.strip() for s in os.environ.get(name, default).split(",") if s.strip()]


DEVICE = os.environ.get("MACL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [int(s) for s in _env_list("MACL_BENCH_SIZES", "256,1024,2048")]
DIM = int(os.environ.get("MACL_BENCH_DIM", "128"))
DTYPE = os.environ.get("MACL_BENCH_DTYPE", "float32")
ROUNDS = int(os.environ.get("MACL_BENCH_ROUNDS", "5"))


def usable_backends() -> List[str]:
    """The backends that can run on ``DEVICE`` here (chosen at run time, never assumed)."""
    usable = [name for name, reason in mk.available_backends(DEVICE).items() if reason is None]
    wanted = _env_list("MACL_BENCH_BACKENDS", ",".join(usable))
    return [name for name in wanted if name in usable]


BACKENDS = usable_backends()


def make_step(loss: str, layout: str, backend: str, n: int, dim: int = DIM, dtype: str = DTYPE,
              device: str = DEVICE, seed: int = 0) -> Callable[[], None]:
    """One forward+backward of ``loss`` on fixed leaves (gradients reset before each step)."""
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    z1, z2 = (torch.randn(n, dim, generator=gen).to(device=device, dtype=torch_dtype)
              .requires_grad_() for _ in range(2))
    leaves = [z1, z2]
    case = LOSS_CASES[loss]  # the registry's configuration of this loss
    scale = CLIP_SCALE
    if case.uses_logit_scale:
        scale = torch.tensor(CLIP_SCALE, device=device, requires_grad=True)
        leaves.append(scale)

    def forward():
        return case.call(z1, z2, layout, logit_scale=scale, backend=backend, validate=False)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        forward().backward()
        sync()

    return step


def run(benchmark, loss: str, layout: str, backend: str, n: int) -> None:
    """Benchmark one (loss, layout, backend, N); the parameters go into the JSON's
    ``extra_info`` for ``plot_micro.py``."""
    step = make_step(loss, layout, backend, n)
    benchmark.group = f"{loss} {layout} D={DIM} {DTYPE} {DEVICE}"
    benchmark.extra_info.update({"loss": loss, "layout": layout, "backend": backend, "N": n,
                                 "D": DIM, "dtype": DTYPE, "device": DEVICE})
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def params(pytest):
    """``@params(pytest)`` on a benchmark: parametrise over usable backends and sizes."""

    def decorate(fn):
        fn = pytest.mark.parametrize("n", SIZES, ids=[f"N{n}" for n in SIZES])(fn)
        return pytest.mark.parametrize("backend", BACKENDS)(fn)

    return decorate
