#!/usr/bin/env bash
# Everything a GPU machine should run for this package, in one go (GPU time is rare): install
# against the machine's torch, run the GPU tests, then the GPU benchmarks. Results land in
# bench/results/<device>/ (commit them). Usage, from the repository root:
#   bash bench/run_gpu_checks.sh [quick]
set -uo pipefail
pip install --no-build-isolation --no-deps -e . > /tmp/macl_install.log 2>&1 || {
    tail -50 /tmp/macl_install.log; exit 1; }
python -m macl_kernels info
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out=bench/results/gpu_${device}
mkdir -p "$out"
MACL_TRITON_AUTOTUNE=0 python -m pytest -q tests/test_triton_backend.py tests/test_cuda_backend.py \
    tests/test_hardening.py 2>&1 | tee "$out/gpu_tests.txt" | tail -30
python -m macl_kernels verify --device cuda --dtype all 2>&1 | tee "$out/verify.txt" | tail -15
if [ "${1:-}" = "quick" ]; then
    python bench/bench_triton_gpu.py --quick --backends reference torch triton cuda --out "$out"
else
    python bench/bench_triton_gpu.py --n 4096 16384 65536 --d 128 256 512 \
        --backends reference torch triton triton_nosym cuda infcl --out "$out"
fi
