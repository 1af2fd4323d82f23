# Set-up commands for a fresh clone (see README.md). Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch lies on this machine kind's disk; an unpinned torch pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= bench/results/demo

.PHONY: install test test-fast demo bench bench-micro dist clean

$(VENV)/.installed: setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/cpu/* csrc/cuda/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PIP) install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PIP) install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

# The quick loop: everything but the tests marked `slow` (compiles, torchrun, training scripts,
# opcheck/gradcheck sweeps), in two pytest-xdist workers of one torch thread each: the tests are
# thousands of small tensors, where one thread per process beats two threads in one process.
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow" tests

demo: install
	$(PY) -m macl_kernels info
	$(PY) -m macl_kernels verify
	$(PY) -m macl_kernels bench --quick --out $(DEMO_OUT)

bench: install
	$(PY) -m macl_kernels bench --out bench/results/latest

# pytest-benchmark micro-benchmarks, one parametrised file over the case registry's losses
# (MACL_BENCH_CASES picks them; never collected by `make test`).
BENCH_MICRO := bench/bench_micro.py
bench-micro: install
	mkdir -p bench/results/micro
	$(PY) -m pytest $(BENCH_MICRO) --benchmark-json=bench/results/micro/micro.json
	$(PY) bench/plot_micro.py bench/results/micro/micro.json --out bench/results/micro/micro.png --csv bench/results/micro/micro.csv

# The sdist and the pure-Python wheel (isolated build: no extension compiled ahead of time; the
# wheel carries csrc/ and builds backend "cpu" on first use). `make install` is the in-place,
# ahead-of-time build.
dist: install
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache macl_kernels/_C_*.so
