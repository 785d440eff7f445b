#!/usr/bin/env bash
# One device call: build the package, a smoke check, the GPU tests, the benchmark; a table last.
#   bash benchmarks/device_run.sh [--full] [--no-tests] [--no-bench] [--tests PYTEST_ARGS] [--test-timeout S]
#                                 [--bench BENCH_ARGS]
# (BENCH_ARGS, e.g. "--configs 'b1 s1024 h16 sq1' --impls cuda,plain_jnp", go to benchmarks/bench.py after the grid flag.)
# Logs and the CSV go to $OUT when set, else ./device_out.
set -euo pipefail
. "$(dirname "$0")/pytest_log.sh"
out=${OUT:-device_out}
mkdir -p "$out"
grid=--quick
run_tests=1
run_bench=1
test_args="tests"
bench_args=""
test_timeout=420
while [ $# -gt 0 ]; do
  case $1 in
    --full) grid= ;;
    --no-tests) run_tests=0 ;;
    --no-bench) run_bench=0 ;;
    --tests) test_args=$2; shift ;;
    --test-timeout) test_timeout=$2; shift ;;
    --bench) bench_args=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"

echo "== build"
JAX_ETAP_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -v . >"$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
grep -E "spill|stack frame" "$out/build.log" | sort | uniq -c | head -20 || true
so=$(python3 -P -c "import jax_etap._etap as m; print(m.__file__)")
# The Hopper kernels must run on the tensor cores' warpgroup instructions (HGMMA in SASS).
cuobjdump -sass "$so" > "$out/sass.txt" 2>/dev/null || true
echo "HGMMA instructions in the extension: $(grep -c HGMMA "$out/sass.txt" || true)"

# The tokamax peer, where benchmarks/peer_wheels.sh's wheels were carried (no network here).
if [ -d .whl/tokamax ]; then
  if python3 -m pip install --no-index --find-links .whl/tokamax tokamax >"$out/peers.log" 2>&1; then
    echo "peer: $(python3 -m pip show tokamax | grep -E '^(Name|Version)' | tr '\n' ' ')"
  else
    echo "peer: tokamax did not install (the benchmark runs without it):"; tail -5 "$out/peers.log"
  fi
fi

echo "== smoke"
timeout 120 python3 benchmarks/smoke.py 2>&1 | tee "$out/smoke.log" || { echo "SMOKE FAILED OR HUNG"; exit 1; }

tests_status=0
if [ "$run_tests" = 1 ]; then
  echo "== tests"
  # -P: never import the uninstalled source tree in place of the installed package.
  # A test failure is reported and fails the script, but the benchmark still runs.
  # eval: PYTEST_ARGS may quote, e.g. --tests "tests -k 'not portable'".
  eval timeout "$test_timeout" python3 -P -m pytest -q -p no:cacheprovider "$test_args" 2>&1 | tee "$out/tests.log" | tail -30 \
    || tests_status=1
  pytest_log_ok "$out/tests.log" || tests_status=1
fi

if [ "$run_bench" = 1 ]; then
  echo "== benchmark"
  # shellcheck disable=SC2086
  # A script without -P: its folder (not the source tree) leads the path, so the installed package is imported.
  eval python3 benchmarks/bench.py $grid "$bench_args" --csv "$out/bench.csv" 2>&1 | tee "$out/bench.log" | tail -40
fi
[ "$tests_status" = 0 ] || { echo "GPU tests FAILED (see tests.log)"; exit 1; }
