#!/usr/bin/env bash
# First contact with a GPU (H100/H200): one command, at most 7 minutes on a 16-core host with no
# network, that returns as much as can be learnt in that time. Usage, from the repository root:
#
#   bash bench/gpu/gpu_first_contact.sh OUTDIR            # run it
#   bash bench/gpu/gpu_first_contact.sh --dry-run OUTDIR  # list the steps, timeouts and estimates
#
# Every step is its own process with its own timeout (a crash or an illegal address poisons
# only its own step); logs and CSVs land in OUTDIR as they come, steps.csv records each step's
# status, exit code, time, timeout and estimate, and stdout carries one line per step plus the
# tail of failing logs (a session often gets back only the last lines of stdout). The build of
# the C++/CUDA extensions runs in the background while the Triton smoke tests (which need no
# build) run. Steps that no longer fit the 7-minute budget are skipped and recorded as such.
# Then bench/gpu/gpu_staged_checks.sh runs the full GPU tests and benchmarks in stages.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: gpu_first_contact.sh [--dry-run] OUTDIR}"
BUDGET_S="${MACL_FIRST_CONTACT_BUDGET_S:-420}"  # 7 minutes
# shellcheck source=gpu_script_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_script_env.sh"
export MACL_TRITON_AUTOTUNE=0          # one default shape per specialisation: no tuning runs
export TRITON_DEFAULT_FP_FUSION=1
export OMP_NUM_THREADS=4
START=$(date +%s)

# name | timeout_s | estimate_s | what (the step list is also the dry run's output)
STEPS=(
  "preflight|60|15|versions (python, torch, triton, numpy), pytest/setuptools, nvcc, compute-sanitizer, nvidia-smi, macl-kernels info"
  "build|360|180|python setup.py build_ext --inplace (background, MAX_JOBS=16)"
  "triton_smoke|240|150|pytest tests/test_gpu_smoke.py (<= 40 Triton specialisations, AUTOTUNE off)"
  "build_wait|360|30|wait for the background build"
  "cuda_smoke|150|60|pytest tests/test_cuda_backend.py (parallel with the sanitizers)"
  "memcheck|150|90|compute-sanitizer --tool memcheck python bench/gpu/gpu_sanitize_case.py cuda triton"
  "racecheck|150|90|compute-sanitizer --tool racecheck python bench/gpu/gpu_sanitize_case.py cuda"
  "bench_bf16_torch|60|15|bench_triton_gpu.py bf16, N 4096 16384, D 128, backend torch"
  "bench_bf16_triton|60|20|same, backend triton"
  "bench_bf16_cuda|60|15|same, backend cuda"
  "bench_fp32_torch|60|15|bench_triton_gpu.py fp32, N 4096 16384, D 128, backend torch"
  "bench_fp32_triton|60|20|same, backend triton (3xTF32)"
  "bench_fp32_cuda|60|15|same, backend cuda"
)

echo "step,status,rc,seconds,timeout_s,estimate_s,log" > "$OUT/steps.csv"

field() { local IFS='|'; local parts; read -r -a parts <<< "$1"; echo "${parts[$(( $2 - 1 ))]}"; }
find_step() { for s in "${STEPS[@]}"; do [ "$(field "$s" 1)" = "$1" ] && echo "$s"; done; }
elapsed() { echo $(( $(date +%s) - START )); }

if [ "$DRY" = 1 ]; then
  total=0
  printf '%-18s %9s %10s  %s\n' step timeout_s estimate_s what
  for s in "${STEPS[@]}"; do
    printf '%-18s %9s %10s  %s\n' "$(field "$s" 1)" "$(field "$s" 2)" "$(field "$s" 3)" \
      "$(field "$s" 4)"
    echo "$(field "$s" 1),dry-run,,,$(field "$s" 2),$(field "$s" 3),$(field "$s" 1).log" \
      >> "$OUT/steps.csv"
  done
  # Wall-clock estimate: the build overlaps the Triton smoke tests (build_wait is what is left
  # of it), the CUDA tests overlap the two sanitizers.
  est() { field "$(find_step "$1")" 3; }
  total=$(( $(est preflight) + $(est triton_smoke) + $(est build_wait)
            + $(printf '%s\n' "$(est cuda_smoke)" "$(est memcheck)" "$(est racecheck)" | sort -n | tail -1) ))
  for b in bf16 fp32; do for k in torch triton cuda; do total=$(( total + $(est "bench_${b}_$k") )); done; done
  echo "estimated wall time: ${total} s (budget ${BUDGET_S} s)"
  missing=0
  for f in tests/test_gpu_smoke.py tests/test_cuda_backend.py bench/gpu/gpu_sanitize_case.py \
           bench/gpu/bench_triton_gpu.py setup.py; do
    [ -f "$f" ] || { echo "missing: $f"; missing=1; }
  done
  echo "output layout: $OUT/{steps.csv,<step>.log,bench_<dtype>_<backend>/bench.csv,summary.txt}"
  exit $missing
fi

# run_step NAME CMD...: run CMD with the step's timeout (capped by the budget left), log to
# OUTDIR/NAME.log, record it in steps.csv, print one line (and the log's tail on failure).
run_step() {
  local name="$1"; shift
  local spec; spec="$(find_step "$name")"
  local timeout_s; timeout_s="$(field "$spec" 2)"
  local estimate_s; estimate_s="$(field "$spec" 3)"
  local left=$(( BUDGET_S - $(elapsed) ))
  if [ "$left" -lt "$estimate_s" ]; then
    echo "$name,skipped (budget),,0,$timeout_s,$estimate_s," >> "$OUT/steps.csv"
    echo "[$(elapsed)s] $name: skipped, ${left}s of the budget left"
    return 0
  fi
  [ "$timeout_s" -gt "$left" ] && timeout_s=$left
  local t0; t0=$(date +%s)
  if [ "$(type -t "$1")" = function ]; then  # a step written as a function of this script
    timeout -k 10 "$timeout_s" bash -c "$1" > "$OUT/$name.log" 2>&1
  else
    timeout -k 10 "$timeout_s" "$@" > "$OUT/$name.log" 2>&1
  fi
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local status=ok
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
  echo "$name,$status,$rc,$secs,$timeout_s,$estimate_s,$name.log" >> "$OUT/steps.csv"
  echo "[$(elapsed)s] $name: $status (rc $rc, ${secs}s of ${timeout_s}s)"
  if [ "$status" != ok ]; then tail -n 15 "$OUT/$name.log" | sed "s/^/    $name| /"; fi
  return 0
}

preflight() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for mod in ("torch", "triton", "numpy", "pytest", "setuptools", "ninja"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "importable"))
    except Exception as exc:
        print(mod, "NOT IMPORTABLE:", type(exc).__name__, exc)
import torch
print("cuda available", torch.cuda.is_available(), torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", "smem/block optin",
          getattr(p, "shared_memory_per_block_optin", "?"))
EOF
  command -v nvcc && nvcc --version | tail -n 2
  command -v compute-sanitizer && compute-sanitizer --version | tail -n 1
  nproc
  "$PY" -m macl_kernels info
}

export -f preflight
export PY OUT
run_step preflight preflight

# The build, in the background: its own timeout, its own log, its status recorded by build_wait.
BUILD_SPEC="$(find_step build)"
( t0=$(date +%s)
  MAX_JOBS=16 timeout -k 10 "$(field "$BUILD_SPEC" 2)" "$PY" setup.py build_ext --inplace \
      > "$OUT/build.log" 2>&1
  echo "$? $(( $(date +%s) - t0 ))" > "$OUT/.build_status.tmp"
  mv "$OUT/.build_status.tmp" "$OUT/.build_status" ) &

run_step triton_smoke "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_gpu_smoke.py

build_wait() {
  while [ ! -s "$OUT/.build_status" ]; do sleep 2; done
  read -r rc secs < "$OUT/.build_status"
  echo "build: rc $rc after ${secs}s"
  tail -n 5 "$OUT/build.log"
  "$PY" -c "import macl_kernels._C_cuda" && "$PY" -m macl_kernels info | grep -i "cuda"
  return "$rc"
}
export -f build_wait
run_step build_wait build_wait
read -r brc bsecs < "$OUT/.build_status" 2>/dev/null || { brc=1; bsecs=0; }
echo "build,$([ "$brc" = 0 ] && echo ok || echo failed),$brc,$bsecs,$(field "$BUILD_SPEC" 2),$(field "$BUILD_SPEC" 3),build.log" >> "$OUT/steps.csv"

# CUDA tests and both sanitizers at once (functional checks: no timing to disturb).
SAN="compute-sanitizer --error-exitcode 9 --print-limit 30"
run_step cuda_smoke "$PY" -m pytest -q -rfE -p no:cacheprovider --maxfail=5 \
    tests/test_cuda_backend.py &
P1=$!
run_step memcheck $SAN --tool memcheck "$PY" bench/gpu/gpu_sanitize_case.py cuda triton &
P2=$!
run_step racecheck $SAN --tool racecheck --racecheck-report analysis "$PY" \
    bench/gpu/gpu_sanitize_case.py cuda &
P3=$!
wait $P1 $P2 $P3

# Mini-benchmarks: one process per dtype and backend, one at a time (no other GPU work).
for dtype in bf16 fp32; do
  for backend in torch triton cuda; do
    run_step "bench_${dtype}_${backend}" "$PY" bench/gpu/bench_triton_gpu.py \
        --out "$OUT/bench_${dtype}_${backend}" --n 4096 16384 --d 128 --dtypes "$dtype" \
        --losses macl_2n clip --backends "$backend" --warmup 1 --repeats 3 --max-seconds 10
  done
done

{ echo "first contact: $(elapsed)s of ${BUDGET_S}s"; cat "$OUT/steps.csv"
  for f in "$OUT"/bench_*/bench.csv; do [ -f "$f" ] && tail -n +2 "$f"; done; } \
  | tee "$OUT/summary.txt"
