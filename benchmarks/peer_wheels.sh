#!/usr/bin/env bash
# Fetches tokamax, a peer of the benchmark, with the packages it needs beyond the device's
# stack (jax, flax, numpy are there) into .whl/tokamax (git-ignored), as wheels for the
# device's Python 3.12 on x86-64 Linux. The device has no network: carry the folder with the
# call (carry: [".whl"]) and device_run.sh installs it before the benchmark.
#   bash benchmarks/peer_wheels.sh [DEST]
# The versions are pinned to the set that was resolved and run together (pydantic-core must
# match pydantic's own pin, typeguard is tokamax's).
set -euo pipefail
dest=${1:-.whl/tokamax}
mkdir -p "$dest"
python3 -m pip download --quiet --dest "$dest" --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux2014_x86_64 \
  tokamax==0.0.12 qwix==0.1.8 einshape==1.0 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 typeguard==2.13.3 immutabledict==4.3.1 tensorboardx==2.6.5 \
  protobuf==7.36.2 opt-einsum==3.4.0 absl-py==2.5.1 packaging==26.4
ls "$dest"
