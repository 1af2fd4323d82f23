"""Micro-benchmarks: forward+backward of MACL (ICML 2023), layout 2n (SimCLR), per usable backend and N.

    python -m pytest bench/bench_macl.py --benchmark-json=OUT.json

(see bench_common.py for the environment knobs).
"""

import pytest

from bench_common import params, run

LOSSES = ["macl"]
LAYOUTS = ["2n"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss", LOSSES)
@params(pytest)
def test_macl(benchmark, backend, n, loss, layout):
    run(benchmark, loss, layout, backend, n)
