"""Micro-benchmarks: forward+backward of the symmetric CLIP loss (cross_sym, fixed logit scale with its gradient), per usable backend and N.

    python -m pytest bench/bench_clip.py --benchmark-json=OUT.json

(see bench_common.py for the environment knobs).
"""

import pytest

from bench_common import params, run

LOSSES = ["clip"]
LAYOUTS = ["cross_sym"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss", LOSSES)
@params(pytest)
def test_clip(benchmark, backend, n, loss, layout):
    run(benchmark, loss, layout, backend, n)
