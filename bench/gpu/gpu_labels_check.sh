#!/usr/bin/env bash
# GPU check of the label mask / eqs extensions and the label losses (one short run on a CUDA
# machine): build both extensions in place against the machine's torch (sm_90a only, to keep the
# build short), then the label tests on the triton (compiled, not interpreted) and cuda backends,
# then the primitive's triton/cuda tests for regressions. Logs go to ${OUT:-/tmp}/.
#   bash bench/gpu/gpu_labels_check.sh
set -uo pipefail
out=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 MACL_TRITON_AUTOTUNE=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/device.txt"
MACL_CUDA_ARCH_FLAGS="-gencode=arch=compute_90a,code=sm_90a" MAX_JOBS=16 \
    timeout 300 python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -40 "$out/build.log"; }
python3 -m macl_kernels info 2>&1 | tee -a "$out/device.txt"
timeout 240 python3 -m pytest -q -x -n 8 -p no:cacheprovider tests/test_primitive_labels.py \
    tests/test_label_masking.py tests/test_supcon.py tests/test_sogclr.py \
    tests/test_supcon_macl.py -k "triton or cuda" 2>&1 | tee "$out/label_tests.txt" | tail -15
timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_primitive.py \
    -k "(triton or cuda) and not opcheck" 2>&1 | tee "$out/primitive_tests.txt" | tail -8
