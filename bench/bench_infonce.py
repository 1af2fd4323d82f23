"""Micro-benchmarks: forward+backward of NT-Xent / InfoNCE, layouts 2n and cross, per usable backend and N.

    python -m pytest bench/bench_infonce.py --benchmark-json=OUT.json

(see bench_common.py for the environment knobs).
"""

import pytest

from bench_common import params, run

LOSSES = ["infonce"]
LAYOUTS = ["2n", "cross"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss", LOSSES)
@params(pytest)
def test_infonce(benchmark, backend, n, loss, layout):
    run(benchmark, loss, layout, backend, n)
