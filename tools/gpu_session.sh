#!/usr/bin/env bash
# Everything a session lent a GPU should run first, as ONE device call that
# ends within 6 minutes (the device tool: run(command="bash tools/gpu_session.sh",
# timeout_s=420)), so that a second run fits in the same 15 minutes of GPU time.
#
# Stages, each in its own time box (cut shorter when the whole budget,
# FG_GPU_BUDGET_S = 320 s, runs low), each logging under $OUT as it goes, so a
# stage that fails or runs long still leaves the others' results:
#
#   1. pre-flight  tools/gpu_preflight.py: dependencies, GPU, NVRTC and CUDA
#                  headers, one kernel through fastgrad's loader.  A failure
#                  ends the script here, with its verdict (exit 2-5).
#   2. install     pip install --no-deps --no-build-isolation -e . (no package
#                  registry on that machine: --no-index); if that fails, run
#                  from the source tree: a temporary fastgrad/ whose entries
#                  link to fastgrad/* and kernels/ (as the install maps
#                  kernels/ to fastgrad.kernels), on PYTHONPATH.
#   3. warm-up     tools/gpu_warmup.py: one process fills the NVRTC (CuPy) and
#                  Numba caches before the parallel test workers start.
#   4. cuda tests  python -m pytest -m cuda tests, 8 xdist workers.
#   5. targets     bench/gpu_targets.py (issue 6's three targets); its JSON is
#                  rewritten after every measurement.
#   6. benchmarks  python -m pytest bench -m cuda (pytest-benchmark, short).
#
# Files under $OUT (at most 8 come back from the device machine): session.log
# (this script's lines and the install), preflight.log (with nvidia-smi),
# warmup.log, cuda_tests.log, gpu_targets.log, gpu_targets.json,
# bench_cuda.log.  Exit status: the pre-flight's when it fails (2-5; 6 when it
# timed out), else 0 when every stage passed, 1 otherwise.
#
# Emulator mode (FG_GPU_EMULATE=1; tools/cuda_emulator/README.md): the same
# stages on the host emulator, with a reduced test selection (FG_GPU_TESTS),
# the targets' --smoke sizes and the benchmarks with --benchmark-disable.
# Other knobs: PY (the interpreter), FG_GPU_INSTALL=auto|pip|source,
# FG_GPU_WORKERS, FG_GPU_BUDGET_S.
#
# Record what it prints in bench/RESULTS.md with the date and the device.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/fastgrad-gpu}
mkdir -p "$OUT"
LOG="$OUT/session.log"
: >"$LOG"
START=$SECONDS
BUDGET=${FG_GPU_BUDGET_S:-320}
EMULATE=${FG_GPU_EMULATE:-0}
INSTALL=${FG_GPU_INSTALL:-auto}
export PYTHONUNBUFFERED=1
# JAX is a CPU-side peer here; on the GPU it would take 75 % of the memory
# in every worker that imports it.
export JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false

say() { echo "$*" | tee -a "$LOG"; }

if [ "$EMULATE" = 1 ]; then
  if [ -z "${PY:-}" ]; then
    PY=python3
    [ -x .venv/bin/python ] && PY="$ROOT/.venv/bin/python"
  fi
  export PYTHONPATH="$ROOT/tools/cuda_emulator${PYTHONPATH:+:$PYTHONPATH}" EMU_CUPY=1
  PLUGIN=(-p conftest_plugin)
  read -r -a TESTS <<<"${FG_GPU_TESTS:-tests/test_step.py}"
  WORKERS=${FG_GPU_WORKERS:-2}
  TARGET_ARGS=(--smoke)
  BENCH_ARGS=(--benchmark-disable -k "mnist or tiny")
  # Emulated kernels are slow: the time boxes below (for a GPU) are
  # stretched 4 times.
  SCALE=4
else
  PY=${PY:-python3}
  SCALE=1
  PLUGIN=()
  read -r -a TESTS <<<"${FG_GPU_TESTS:-tests}"
  WORKERS=${FG_GPU_WORKERS:-8}
  TARGET_ARGS=(--rounds 7)
  BENCH_ARGS=(--benchmark-max-time=0.2 --benchmark-columns=median,iqr,rounds
              --benchmark-sort=name)
fi

[ -z "${FG_GPU_BUDGET_S:-}" ] && BUDGET=$((BUDGET * SCALE))
# An absolute interpreter path: some stages run from another directory.
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac

# box CAP RESERVE: the seconds a stage may take -- CAP, or less, so that the
# stages after it keep RESERVE seconds of the whole budget (at least 10);
# both stretched by SCALE on the emulator.
box() {
  local cap=$(($1 * SCALE)) left=$((START + BUDGET - SECONDS - $2 * SCALE))
  [ "$left" -lt 10 ] && left=10
  [ "$left" -lt "$cap" ] && echo "$left" || echo "$cap"
}

declare -a SUMMARY=()
# stage NAME CAP RESERVE LOGFILE CMD...: run CMD in its time box, output to
# LOGFILE; record and print how it ended.
stage() {
  local name=$1 cap=$2 reserve=$3 log=$4 t s rc
  shift 4
  t=$(box "$cap" "$reserve")
  say "== $name (time box ${t} s, at $((SECONDS - START)) s)"
  s=$SECONDS
  timeout -k 5 "$t" "$@" >>"$log" 2>&1
  rc=$?
  local how="exit $rc"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && how="TIMED OUT after ${t} s"
  SUMMARY+=("$(printf '%-11s %-28s %4d s' "$name" "$how" $((SECONDS - s)))")
  say "   $name: $how, $((SECONDS - s)) s"
  return "$rc"
}

# The source tree as an importable package: fastgrad/ with kernels/ inside,
# as the install maps it.  Links, not copies: Numba's cache and the .cu
# sources stay the repository's.
SRC=$(mktemp -d "${TMPDIR:-/tmp}/fastgrad-src.XXXXXX")
trap 'rm -rf "$SRC"' EXIT
mkdir "$SRC/fastgrad"
for f in "$ROOT"/fastgrad/*; do ln -s "$f" "$SRC/fastgrad/"; done
ln -s "$ROOT/kernels" "$SRC/fastgrad/kernels"

# 1. pre-flight: against the source tree (nothing is installed yet; the
#    script's own directory, tools/, is what python puts first on sys.path).
{
  date -u
  uname -srm
  if [ "$EMULATE" != 1 ]; then timeout 20 nvidia-smi || echo "nvidia-smi failed"; fi
} >"$OUT/preflight.log" 2>&1
PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" \
  stage preflight 60 240 "$OUT/preflight.log" "$PY" tools/gpu_preflight.py
rc=$?
tail -1 "$OUT/preflight.log" | tee -a "$LOG"
if [ "$rc" != 0 ]; then
  say "stopped after the pre-flight (exit $rc): see $OUT/preflight.log"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc=6
  exit "$rc"
fi

# 2. install, or the source tree.  Checked from another directory, where the
#    repository's own fastgrad/ (which lacks kernels/) cannot shadow it.
check_import() {
  (cd / && "$PY" -c "import fastgrad, fastgrad.kernels.cuda; print('fastgrad from', fastgrad.__file__)")
}
installed=0
if [ "$INSTALL" != source ]; then
  stage install 60 220 "$LOG" "$PY" -m pip install --no-index --no-deps --no-build-isolation \
    --disable-pip-version-check -q -e . && imp=$(check_import 2>&1) && installed=1
fi
if [ "$installed" = 1 ]; then
  say "   fastgrad: installed (${imp##*$'\n'})"
elif [ "$INSTALL" = pip ]; then
  say "   install failed and FG_GPU_INSTALL=pip: stopping"
  exit 1
else
  export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
  # Python puts the working directory (or a script's directory) first on
  # sys.path; the repository root's fastgrad/ has no kernels/, so not there.
  export PYTHONSAFEPATH=1
  imp=$(check_import 2>&1)
  say "   fastgrad: from the source tree (${imp##*$'\n'}; PYTHONPATH=$SRC)"
  # Not a failure of the session: the stages run on the source tree.
  [ "$INSTALL" != source ] && SUMMARY[${#SUMMARY[@]}-1]="$(printf '%-11s %s' install \
    'no usable install: on the source tree')"
fi

# 3. warm-up.
stage warm-up 90 150 "$OUT/warmup.log" "$PY" tools/gpu_warmup.py
tail -1 "$OUT/warmup.log" | tee -a "$LOG"

# 4. cuda tests: xdist workers when there, 2 BLAS threads each (8 x 2 = the
#    machine's 16 cores); per-test and session time limits when
#    pytest-timeout is there, so a stuck test cannot take the box.
par=() tmo=()
"$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ] && par=(-n "$WORKERS")
# The session limit ends pytest cleanly (with its summary) before the box kills it.
t_tests=$(box 150 75)
t_session=$((t_tests > 40 ? t_tests - 15 : t_tests * 2 / 3))
# --session-timeout came with pytest-timeout 2.3.
"$PY" -c "import importlib.metadata as m, sys
sys.exit(tuple(map(int, m.version('pytest-timeout').split('.')[:2])) < (2, 3))" 2>/dev/null \
  && tmo=(--timeout $((90 * SCALE)) --session-timeout $t_session)
OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 \
  stage "cuda tests" 150 75 "$OUT/cuda_tests.log" "$PY" -m pytest -q -m cuda "${TESTS[@]}" \
  "${PLUGIN[@]}" "${par[@]}" "${tmo[@]}" -p no:cacheprovider -rfE --continue-on-collection-errors
{ grep -E "^(FAILED|ERROR) " "$OUT/cuda_tests.log" | head -40; tail -1 "$OUT/cuda_tests.log"; } \
  | tee -a "$LOG"

# 5. the targets.
stage targets 60 30 "$OUT/gpu_targets.log" "$PY" bench/gpu_targets.py "${TARGET_ARGS[@]}" \
  --json "$OUT/gpu_targets.json"
tail -12 "$OUT/gpu_targets.log"

# 6. the cuda benchmarks.
stage benchmarks 45 0 "$OUT/bench_cuda.log" "$PY" -m pytest bench -m cuda -q \
  -p no:cacheprovider "${PLUGIN[@]}" "${BENCH_ARGS[@]}"
tail -3 "$OUT/bench_cuda.log" | tee -a "$LOG"

say "== summary ($((SECONDS - START)) s of a ${BUDGET} s budget)"
for line in "${SUMMARY[@]}"; do say "   $line"; done
failed=$(printf '%s\n' "${SUMMARY[@]}" | grep -cv "exit 0 \|on the source tree")
if [ "$failed" = 0 ]; then say "SESSION OK"; else say "SESSION INCOMPLETE: $failed stage(s) failed or timed out"; fi
[ "$failed" = 0 ]
