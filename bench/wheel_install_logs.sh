#!/usr/bin/env bash
# Two install logs of the wheel into a fresh virtual environment (issue 24, item 9):
#   a) no C/C++ compiler on PATH: what `info` and `auto` say;
#   b) with a compiler: the first-use build message, then `info`.
# The wheel is built from the committed tree (git archive HEAD), isolated, with python -m build.
set -uo pipefail
# Usage: bench/wheel_install_logs.sh OUTDIR   (about 2 minutes: torch from the index, one first-use build)
OUT=$(mkdir -p "${1:?usage: bench/wheel_install_logs.sh OUTDIR}" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d)
mkdir -p "$OUT"
REV=$(git -C $REPO rev-parse --short HEAD)
git -C $REPO archive HEAD | tar -x -C "$W" --one-top-level=src
TORCH=$(sed -n 's/^TORCH_SPEC ?= *//p' $REPO/Makefile)

run() { echo "\$ $*"; "$@" 2>&1; echo "[exit status $?]"; echo; }

{
echo "# The wheel: built from commit $REV with python -m build (isolated), $(date -u +%F' '%H:%M' UTC')"
run $REPO/.venv/bin/python -m build --wheel --outdir "$W/dist" "$W/src" | grep -E '^\$|macl-kernels setup.py|Successfully|exit status'
WHEEL=$(ls "$W"/dist/*.whl)
run python3 -m zipfile -l "$WHEEL" | grep -E '\$|csrc|\.so|exit'
run python3 -m venv "$W/venv"
run "$W/venv/bin/pip" install --quiet "$TORCH" "$WHEEL"
run "$W/venv/bin/pip" list
} > "$OUT/00_wheel.log" 2>&1

PY="$W/venv/bin/python"
cd "$W"
LOSS='import torch, macl_kernels as mk
z1, z2 = torch.randn(64, 32), torch.randn(64, 32)
print("infonce_loss (auto):", mk.infonce_loss(z1, z2).item())
print("infonce_loss (auto, again):", mk.infonce_loss(z1, z2).item())
print("infonce_loss (torch):", mk.infonce_loss(z1, z2, backend="torch").item())'
CPU='import time, torch, macl_kernels as mk
z1, z2 = torch.randn(64, 32), torch.randn(64, 32)
t = time.perf_counter()
print("infonce_loss (auto):", mk.infonce_loss(z1, z2).item(), f"({time.perf_counter() - t:.0f} s, first call)")
print("infonce_loss (cpu):", mk.infonce_loss(z1, z2, backend="cpu").item())
print("infonce_loss (torch):", mk.infonce_loss(z1, z2, backend="torch").item())'

export MACL_KERNELS_CACHE="$W/cache"
{
echo "# (a) No C/C++ compiler: PATH is the environment's bin/ only (no cc, c++, g++, clang; CC/CXX unset)"
echo "# MACL_KERNELS_CACHE=$MACL_KERNELS_CACHE (empty)"
echo
env -u CC -u CXX PATH="$W/venv/bin" /bin/bash -c "$(declare -f run); echo \"PATH=\$PATH\"; run command -v c++ g++ gcc cc clang; run $PY -m macl_kernels info; run $PY -c '$LOSS'"
} > "$OUT/a_no_compiler.log" 2>&1

{
echo "# (b) With a compiler on PATH: $(command -v c++) ($(c++ --version | head -1))"
echo "# MACL_KERNELS_CACHE=$MACL_KERNELS_CACHE (empty before the first call)"
echo
run "$PY" -m macl_kernels info
run "$PY" -c "$CPU"
echo "# a second process: the cached build, no message"
run "$PY" -c "$CPU"
run "$PY" -m macl_kernels info
run find "$MACL_KERNELS_CACHE" -maxdepth 3
} > "$OUT/b_with_compiler.log" 2>&1
echo done
