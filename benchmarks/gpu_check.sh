#!/usr/bin/env bash
# On a CUDA machine: the test suite with CuPy required (in parallel with pytest-xdist when it is installed), every
# benchmark and reproduction in quick mode on CuPy (benchmarks/run_all), the paper's speed test on CuPy at n = 1e4
# (cold: the first call in a fresh process, then warm), 5e4 and 1e5, the matrix-free path against the exact one at
# n = 5e4 (its own step: its time is not known yet), the solver benchmark on CuPy, and the Dask path on the GPU
# against the plain CuPy one (issue 16). Runs from a bare checkout (PYTHONPATH=., no install) in at most 8 minutes:
# each step has its own time limit (environment variables below, 135 + 55 + 140 + 55 + 45 + 50 s) so one slow step
# cannot eat the others' time. Dask is not on the GPU image: carry its wheels in .whl (see the device notes in
# benchmarks/README.md); without them the Dask tests skip and the Dask step reports what is missing.
#
# $OUT receives at most seven files: device.txt, tests.log, bench_posterior.log, bench_iterative.log,
# bench_solvers.log, bench_dask.log and gpu_check.tar.gz (every log, JSON and plot of every step).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT="${OUT:-benchmarks/results/gpu_check}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
status=0
if [ -d .whl ]; then  # dask and distributed for Python 3.12, carried (not installed on the image)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:.
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import backends; print(backends.available_backends())"; } 2>&1 | tee "$OUT/device.txt"

# pytest-xdist runs the suite on 8 workers; pytest-benchmark (if installed) warns under xdist and filterwarnings
# turns that into an error, so its plugin is switched off
parallel=()
if python3 -c "import xdist" 2>/dev/null; then parallel=(-n "${GPU_TESTS_WORKERS:-8}" -p no:benchmark); fi
LINGP_TEST_BACKENDS=numpy,cupy timeout "${GPU_TESTS_TIMEOUT:-135}" python3 -m pytest -q -p no:cacheprovider \
  "${parallel[@]}" ${GPU_TESTS_SELECT:-tests} > "$OUT/tests.log" 2>&1
[ $? -eq 0 ] || status=1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 40

RUN_ALL_TIMEOUT="${RUN_ALL_TIMEOUT:-55}" benchmarks/run_all --backend cupy --out "$WORK/run_all" || status=1

timeout "${POSTERIOR_TIMEOUT:-140}" python3 benchmarks/bench_posterior.py --backend cupy --cold \
  --sizes ${POSTERIOR_SIZES:-10000 50000 100000} --baseline-max-n 10000 --baseline-cap 30 \
  --out "$WORK/bench_posterior" 2>&1 | tee "$OUT/bench_posterior.log" || status=1

timeout "${ITERATIVE_TIMEOUT:-55}" python3 benchmarks/bench_posterior.py --backend cupy \
  --sizes ${ITERATIVE_SIZES:-50000} --iterative-sizes ${ITERATIVE_SIZES:-50000} --baseline-max-n 0 \
  --out "$WORK/bench_iterative" 2>&1 | tee "$OUT/bench_iterative.log" || status=1

timeout "${SOLVERS_TIMEOUT:-45}" python3 benchmarks/bench_solvers.py --backend cupy --sizes 8000 16000 \
  --out "$WORK/bench_solvers" 2>&1 | tee "$OUT/bench_solvers.log" || status=1

timeout "${DASK_TIMEOUT:-50}" python3 benchmarks/bench_dask.py --backend cupy --workers 1 --n "${DASK_N:-2000}" \
  --probe-n 20000 --latency-reps 20 --out "$WORK/bench_dask" 2>&1 | tee "$OUT/bench_dask.log" || status=1

tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" . && rm -rf "$WORK"
exit $status
