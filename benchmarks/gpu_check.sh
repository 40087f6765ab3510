#!/usr/bin/env bash
# On a CUDA machine: the whole test suite with CuPy required, then every benchmark that takes --backend cupy.
# Runs from a bare checkout (PYTHONPATH=., no install). Logs and results go under $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import backends; print(backends.available_backends())"; } 2>&1 | tee "$OUT/device.txt"

LINGP_TEST_BACKENDS=numpy,cupy timeout 240 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for script in benchmarks/bench_*.py; do
  [ -e "$script" ] || continue
  grep -q -- "--backend" "$script" || continue
  name=$(basename "$script" .py)
  timeout 120 python3 "$script" --backend cupy --quick --out "$OUT/$name" 2>&1 | tee "$OUT/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
