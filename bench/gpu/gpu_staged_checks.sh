#!/usr/bin/env bash
# The full GPU tests and benchmarks, after bench/gpu/gpu_first_contact.sh, in stages that each fit
# one 8-minute window (a GPU session's commands are limited to 10). Usage, from the repository
# root, one stage per call (the extension must be built: first contact does it in place):
#
#   bash bench/gpu/gpu_staged_checks.sh OUTDIR STAGE          # STAGE: one of the names below
#   bash bench/gpu/gpu_staged_checks.sh --dry-run OUTDIR      # list the stages, steps, timeouts
#
# Each step is its own process with its own timeout, logging into OUTDIR/STAGE/<step>.log;
# OUTDIR/STAGE/steps.csv records status, exit code, time, timeout and estimate per step.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: gpu_staged_checks.sh [--dry-run] OUTDIR [STAGE]}"
STAGE="${2:-}"
# shellcheck source=gpu_script_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_script_env.sh"
export TRITON_DEFAULT_FP_FUSION=1
export OMP_NUM_THREADS=4
PYTEST="$PY -m pytest -q -rfE -p no:cacheprovider --maxfail=20"
BENCH="$PY bench/gpu/bench_triton_gpu.py"

# stage|step|timeout_s|estimate_s|command (AUTOTUNE off for tests, on for the benchmarks)
STEPS=(
  "triton_tests|triton_backend|470|300|MACL_TRITON_AUTOTUNE=0 $PYTEST tests/test_triton_backend.py"
  "primitive_tests|primitive|470|240|MACL_TRITON_AUTOTUNE=0 $PYTEST tests/test_primitive.py"
  "cuda_tests|cuda_backend|200|90|$PYTEST tests/test_cuda_backend.py"
  "cuda_tests|hardening|260|150|MACL_TRITON_AUTOTUNE=0 $PYTEST tests/test_hardening.py"
  "losses_tests|losses|470|360|MACL_TRITON_AUTOTUNE=0 $PYTEST tests/test_losses.py"
  "verify|verify|300|150|MACL_TRITON_AUTOTUNE=0 $PY -m macl_kernels verify --device cuda --dtype all"
  "verify|inventory|170|120|$PY -m macl_kernels kernels --arch sm_90 --jobs 16 --quiet --csv \$STAGE_OUT/inventory_sm90.csv --md \$STAGE_OUT/inventory_sm90.md"
  "bench_bf16|bench|470|360|$BENCH --out \$STAGE_OUT/bench --n 4096 16384 65536 --d 128 256 512 768 --dtypes bf16 --backends torch triton triton_nosym cuda --max-seconds 15"
  "bench_fp32|bench|470|360|$BENCH --out \$STAGE_OUT/bench --n 4096 16384 65536 --d 128 256 512 --dtypes fp32 --backends torch triton cuda --max-seconds 15"
  "bench_tf32|bench|470|300|$BENCH --out \$STAGE_OUT/bench --tf32 --n 4096 16384 65536 --d 128 256 512 768 --dtypes fp32 --backends torch triton cuda --max-seconds 15"
)
field() { local IFS='|'; local parts; read -r -a parts <<< "$1"; echo "${parts[$(( $2 - 1 ))]}"; }

if [ "$DRY" = 1 ]; then
  printf '%-16s %-15s %9s %10s  %s\n' stage step timeout_s estimate_s command
  for s in "${STEPS[@]}"; do
    printf '%-16s %-15s %9s %10s  %s\n' "$(field "$s" 1)" "$(field "$s" 2)" "$(field "$s" 3)" \
      "$(field "$s" 4)" "$(field "$s" 5)"
  done
  bad=0
  for stage in $(for s in "${STEPS[@]}"; do field "$s" 1; done | uniq); do
    total=0
    for s in "${STEPS[@]}"; do
      [ "$(field "$s" 1)" = "$stage" ] && total=$(( total + $(field "$s" 3) ))
    done
    echo "stage $stage: timeouts sum to ${total} s"
    [ "$total" -le 480 ] || { echo "  stage $stage exceeds 8 minutes"; bad=1; }
  done
  for f in tests/test_triton_backend.py tests/test_primitive.py tests/test_cuda_backend.py \
           tests/test_hardening.py tests/test_losses.py bench/gpu/bench_triton_gpu.py; do
    [ -f "$f" ] || { echo "missing: $f"; bad=1; }
  done
  echo "output layout: $OUT/<stage>/{steps.csv,<step>.log,bench/bench.csv,inventory_sm90.csv}"
  exit $bad
fi

[ -n "$STAGE" ] || { echo "name a stage (--dry-run lists them)"; exit 2; }
STAGE_OUT="$OUT/$STAGE"
mkdir -p "$STAGE_OUT"
export STAGE_OUT
echo "step,status,rc,seconds,timeout_s,estimate_s,log" > "$STAGE_OUT/steps.csv"
found=0
for s in "${STEPS[@]}"; do
  [ "$(field "$s" 1)" = "$STAGE" ] || continue
  found=1
  step="$(field "$s" 2)"; timeout_s="$(field "$s" 3)"; estimate_s="$(field "$s" 4)"
  t0=$(date +%s)
  timeout -k 10 "$timeout_s" bash -c "$(field "$s" 5)" > "$STAGE_OUT/$step.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  status=ok
  [ "$rc" -ne 0 ] && status=failed
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status=timeout
  echo "$step,$status,$rc,$secs,$timeout_s,$estimate_s,$step.log" >> "$STAGE_OUT/steps.csv"
  echo "$STAGE/$step: $status (rc $rc, ${secs}s of ${timeout_s}s)"
  tail -n 12 "$STAGE_OUT/$step.log" | sed "s/^/    $step| /"
done
[ "$found" = 1 ] || { echo "unknown stage $STAGE (--dry-run lists them)"; exit 2; }
