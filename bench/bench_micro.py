"""pytest-benchmark micro-benchmarks: forward+backward of the registry's loss cases, per usable
backend and N.

Not tests: nothing asserts a time, and ``make test`` (``pytest -q tests``) never collects this
folder. Run them with (``make bench-micro``)

    python -m pytest bench/bench_micro.py --benchmark-json=bench/results/micro/micro.json
    python bench/plot_micro.py bench/results/micro/micro.json --out bench/results/micro/micro.png

Every benchmark times one training step of a loss case of ``macl_kernels.tools.cases`` (the
one registry ``verify``, ``bench`` and ``profile`` use): the step of ``worker.LossStep`` (mean
reduction, ``validate=False`` as in a training loop, a leaf logit scale for CLIP and SigLIP, the
device synchronised at its end) on fixed random ``[N, D]`` leaves, for every usable backend and
every size. Environment knobs (all optional):

``MACL_BENCH_CASES``    comma-separated ``LOSS:LAYOUT`` cases of the registry, or ``all`` for
                        every (loss, layout) pair of ``cases.LOSS_LAYOUTS`` (default
                        ``DEFAULT_CASES``: MACL, InfoNCE in both layouts, CLIP, DCL, DCLW, TFree)
``MACL_BENCH_SIZES``    comma-separated N, rows per view (default ``256,1024,2048``)
``MACL_BENCH_DIM``      embedding dimension D (default 128)
``MACL_BENCH_DTYPE``    float32 (default), float64, bfloat16, float16
``MACL_BENCH_DEVICE``   cpu or cuda (default cuda when available)
``MACL_BENCH_ROUNDS``   timed rounds per benchmark (default 5; one warm-up round before)
``MACL_BENCH_BACKENDS`` comma-separated backends (default every usable one, incl. reference)
"""

from __future__ import annotations

import os
import sys
from typing import List, Tuple

import pytest
import torch

try:
    import macl_kernels as mk
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import macl_kernels as mk

from macl_kernels.tools import worker
from macl_kernels.tools.cases import LOSS_CASES, LOSS_LAYOUTS, case_name

DEFAULT_CASES = "macl:2n,infonce:2n,infonce:cross,clip:cross_sym,dcl:2n,dclw:2n,tfree:2n"


def _env_list(name: str, default: str) -> List[str]:
    return [s.strip() for s in os.environ.get(name, default).split(",") if s.strip()]


def selected_cases() -> List[Tuple[str, str]]:
    """The ``(loss, layout)`` pairs of ``MACL_BENCH_CASES``, each checked against the
    registry."""
    wanted = _env_list("MACL_BENCH_CASES", DEFAULT_CASES)
    if wanted == ["all"]:
        return list(LOSS_LAYOUTS)
    cases = []
    for item in wanted:
        loss, _, layout = item.partition(":")
        loss = case_name(loss)
        if loss not in LOSS_CASES:
            raise ValueError(f"MACL_BENCH_CASES: unknown loss {loss!r}; choose from "
                             f"{list(LOSS_CASES)}")
        layout = layout.strip() or LOSS_CASES[loss].layouts[0]
        if (loss, layout) not in LOSS_LAYOUTS:
            raise ValueError(f"MACL_BENCH_CASES: loss {loss!r} has layouts "
                             f"{list(LOSS_CASES[loss].layouts)}, got {layout!r}")
        cases.append((loss, layout))
    return cases


DEVICE = os.environ.get("MACL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [int(s) for s in _env_list("MACL_BENCH_SIZES", "256,1024,2048")]
DIM = int(os.environ.get("MACL_BENCH_DIM", "128"))
DTYPE = os.environ.get("MACL_BENCH_DTYPE", "float32")
ROUNDS = int(os.environ.get("MACL_BENCH_ROUNDS", "5"))
CASES = selected_cases()


def usable_backends() -> List[str]:
    """The backends that can run on ``DEVICE`` here (chosen at run time, never assumed)."""
    usable = [name for name, reason in mk.available_backends(DEVICE).items() if reason is None]
    wanted = _env_list("MACL_BENCH_BACKENDS", ",".join(usable))
    return [name for name in wanted if name in usable]


BACKENDS = usable_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES, ids=[f"N{n}" for n in SIZES])
@pytest.mark.parametrize("loss,layout", CASES, ids=[f"{loss}-{layout}" for loss, layout in CASES])
def test_step(benchmark, loss, layout, n, backend):
    """One (loss, layout, N, backend); the parameters go into the JSON's ``extra_info`` for
    ``plot_micro.py``."""
    z1, z2 = worker.make_inputs(n, DIM, getattr(torch, DTYPE), torch.device(DEVICE), seed=0)
    step = worker.make_step(loss, layout, backend, z1, z2, synchronize=True)
    benchmark.group = f"{loss} {layout} D={DIM} {DTYPE} {DEVICE}"
    benchmark.extra_info.update({"loss": loss, "layout": layout, "backend": backend, "N": n,
                                 "D": DIM, "dtype": DTYPE, "device": DEVICE})
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
