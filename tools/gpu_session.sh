#!/usr/bin/env bash
# Everything a session lent a GPU should run first, as ONE device call
# (the device tool: run(command="bash tools/gpu_session.sh", timeout_s=600)).
# Each stage has its own time box and writes its log under $OUT as it goes,
# so a stage that fails or runs long still leaves the others' results:
#
#   device.txt        nvidia-smi, versions
#   cuda_tests.log    python -m pytest -m cuda tests   (every GPU test, ~1800)
#   gpu_targets.log   python bench/gpu_targets.py       (issue 6's three targets)
#   gpu_targets.json
#   bench_cuda.log    python -m pytest bench -m cuda    (the pytest-benchmark suite, short)
#
# The machine has numpy, numba, cupy, torch, pytest(-xdist, -timeout, -benchmark),
# hypothesis, safetensors, scikit-learn: the project installs without deps.
# Record what it prints in bench/RESULTS.md with the date and the device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastgrad-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

{ date -u; nvidia-smi; $PY --version; } >"$OUT/device.txt" 2>&1
$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/device.txt" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/device.txt"; exit 1; }
$PY -c "import fastgrad, cupy, numba, torch; print('devices', fastgrad.available_devices(),
'cupy', cupy.__version__, 'numba', numba.__version__, 'torch', torch.__version__)" \
  2>&1 | tee -a "$OUT/device.txt"

# Several pytest workers when xdist is there: the tests are short, NVRTC and
# Numba compile once per worker (both cache on disk).
par=""
$PY -c "import xdist" 2>/dev/null && par="-n 8"
tmo=""
$PY -c "import pytest_timeout" 2>/dev/null && tmo="--timeout 120"

echo "== cuda tests (time box 270 s)"
timeout 270 $PY -m pytest -q -m cuda tests $par $tmo -p no:cacheprovider -rfE \
  >"$OUT/cuda_tests.log" 2>&1
echo "exit $?"; tail -15 "$OUT/cuda_tests.log"

echo "== GPU targets (time box 150 s)"
timeout 150 $PY bench/gpu_targets.py --rounds 7 --json "$OUT/gpu_targets.json" \
  >"$OUT/gpu_targets.log" 2>&1
echo "exit $?"; cat "$OUT/gpu_targets.log" | tail -20

echo "== cuda benchmarks (time box 100 s)"
timeout 100 $PY -m pytest bench -m cuda -q -p no:cacheprovider --benchmark-max-time=0.2 \
  --benchmark-columns=median,iqr,rounds --benchmark-sort=name >"$OUT/bench_cuda.log" 2>&1
echo "exit $?"; tail -25 "$OUT/bench_cuda.log"
