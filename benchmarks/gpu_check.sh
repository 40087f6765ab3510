#!/usr/bin/env bash
# On a CUDA machine: the whole test suite with CuPy required, every benchmark and reproduction in quick mode on CuPy
# (benchmarks/run_all), then the paper's speed test at full size on CuPy. Runs from a bare checkout (PYTHONPATH=.,
# no install). Logs and results go under $OUT when it is set. Each step has its own time limit so one slow step
# cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import backends; print(backends.available_backends())"; } 2>&1 | tee "$OUT/device.txt"

LINGP_TEST_BACKENDS=numpy,cupy timeout "${GPU_TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider \
  ${GPU_TESTS_SELECT:-tests} > "$OUT/tests.log" 2>&1
[ $? -eq 0 ] || status=1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 40

RUN_ALL_TIMEOUT="${RUN_ALL_TIMEOUT:-90}" benchmarks/run_all --backend cupy --out "$OUT/run_all" || status=1

timeout "${POSTERIOR_TIMEOUT:-240}" python3 benchmarks/bench_posterior.py --backend cupy \
  --sizes ${POSTERIOR_SIZES:-1000 5000 10000 20000} --baseline-max-n 1000 --baseline-cap 60 \
  --out "$OUT/bench_posterior" 2>&1 | tee "$OUT/bench_posterior.log" || status=1
exit $status
