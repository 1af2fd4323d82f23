"""Micro-benchmarks: forward+backward of the temperature-free InfoNCE, layout 2n, per usable backend and N.

    python -m pytest bench/bench_tfree.py --benchmark-json=OUT.json

(see bench_common.py for the environment knobs).
"""

import pytest

from bench_common import params, run

LOSSES = ["tfree"]
LAYOUTS = ["2n"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss", LOSSES)
@params(pytest)
def test_tfree(benchmark, backend, n, loss, layout):
    run(benchmark, loss, layout, backend, n)
