#!/usr/bin/env bash
# One device call: build the package, run the GPU tests, run the benchmark, print a table last.
#   bash benchmarks/device_run.sh [--full]
# Logs and the CSV go to $OUT (the device tool's return folder) when set, else ./device_out.
set -euo pipefail
out=${OUT:-device_out}
mkdir -p "$out"
grid=--quick
for arg in "$@"; do
  case $arg in
    --full) grid= ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"

echo "== build"
JAX_ETAP_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -v . >"$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
grep -E "registers|spill|stack frame" "$out/build.log" | sort | uniq -c | head -20 || true

echo "== tests"
# -P: never import the uninstalled source tree in place of the installed package.
# A test failure is reported and fails the script, but the benchmark still runs.
tests_status=0
python3 -P -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" | tail -25 || tests_status=1

echo "== benchmark"
python3 -P -m jax_etap.bench $grid --csv "$out/bench.csv" 2>&1 | tee "$out/bench.log" | tail -40
[ "$tests_status" = 0 ] || { echo "GPU tests FAILED (see tests.log)"; exit 1; }
