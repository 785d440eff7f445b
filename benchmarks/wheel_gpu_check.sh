#!/usr/bin/env bash
# The prebuilt wheel on a GPU machine, as a user without a CUDA toolkit gets it: installed
# into a fresh virtual environment with no nvcc on PATH and no build step (pip --no-index
# --no-deps; jax, torch and pytest come from the machine's site packages), the kernel
# checked present, then the test suite run against that install.
#   bash benchmarks/wheel_gpu_check.sh WHEEL_DIR [PYTEST_ARGS...]
# PYTEST_ARGS default to the whole suite (`tests`). Where pytest-xdist's wheel is in
# $XDIST_WHEELS (a folder), it is installed and the tests run on 4 workers.
# The log and a JUnit XML go to $OUT when set, else ./device_out.
set -euo pipefail
wheel_dir=${1:?usage: wheel_gpu_check.sh WHEEL_DIR [PYTEST_ARGS...]}
shift
out=${OUT:-device_out}
mkdir -p "$out"

venv=$(mktemp -d)/venv
python3 -m venv --system-site-packages "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
# No nvcc anywhere on PATH: the install must not compile.
PATH=$(python3 -c "import os; print(os.pathsep.join(d for d in os.environ['PATH'].split(os.pathsep) if not os.path.isfile(os.path.join(d, 'nvcc'))))")
export PATH
if command -v nvcc >/dev/null; then echo "nvcc is still on PATH: $(command -v nvcc)" >&2; exit 1; fi
python3 -m pip install -q --no-index --no-deps --force-reinstall "$wheel_dir"/jax_etap-*.whl
workers=()
if [ -n "${XDIST_WHEELS:-}" ] && python3 -m pip install -q --no-index --no-deps "$XDIST_WHEELS"/*.whl; then
  workers=(-n 4)
fi

# -P: the installed package, never the source tree beside it.
python3 -P -c "
import jax, jax_etap, json
info = jax_etap.build_info()
print('jax', jax.__version__, jax.devices(), json.dumps(info), 'from', jax_etap.__file__)
assert '$venv' in jax_etap.__file__, 'jax_etap was not imported from the fresh install'
assert jax_etap.kernel_available(), 'the wheel brought no kernel that runs on this GPU'
" | tee "$out/wheel_check.txt"

set +e
XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -P -m pytest -q -p no:cacheprovider "${workers[@]}" \
  --junitxml="$out/wheel_tests.xml" --durations=15 "${@:-tests}" >"$out/wheel_tests.log" 2>&1
status=$?
set -e
tail -40 "$out/wheel_tests.log"
exit "$status"
