# Sourced by the GPU session scripts (gpu_first_contact.sh, gpu_staged_checks.sh) after they have
# set OUT: run from the repository root, OUT made absolute, this tree first on PYTHONPATH, one
# Triton cache under OUT shared by every step (compile once).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="$OUT/.triton_cache"
