#!/usr/bin/env bash
# One device call: the wide kernel's in-kernel clock (wide_kernel_clock.patch) on the tree
# and on variants of it, at b128 s8K with 128 and 64 heads; per build and config, the
# median over the printed CTAs of each stamp (cycles since warpgroup 0's start of pair 6).
#   bash experiments/wide_clock.sh [PATCH ...]     (e.g. experiments/no_refill.patch)
# The raw TSW lines go to $OUT, else ./device_out/clock.
set -euo pipefail
. "$(dirname "$0")/patched_build.sh"
builds=(tree) patches=("")  # per build, the patch applied on top of the clock (absolute)
for patch in "$@"; do
  builds+=("$(basename "$patch" .patch)")
  patches+=("$(cd "$(dirname "$patch")" && pwd)/$(basename "$patch")")
done
cd "$(dirname "$0")/.."
out=${OUT:-device_out/clock}
mkdir -p "$out"
pids=()
for i in "${!builds[@]}"; do
  d=/tmp/clock_${builds[$i]}
  rm -rf "$d"
  applied=("$PWD/experiments/wide_kernel_clock.patch")
  if [ -n "${patches[$i]}" ]; then applied+=("${patches[$i]}"); fi
  start_patched_build "$d/src" "$d/pkg" "$out/build_${builds[$i]}.log" "${applied[@]}"
  pids+=("$!")
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "build ${builds[$i]} failed: $out/build_${builds[$i]}.log" >&2; exit 1; }
done
for heads in 128 64; do
  for v in "${builds[@]}"; do
    PYTHONPATH=/tmp/clock_$v/pkg python3 benchmarks/profile_kernel.py --batch 128 --seqlen 8192 --heads $heads \
      --calls 3 2>&1 | grep ^TSW >"$out/tsw_h${heads}_$v.txt" || true
    python3 benchmarks/clock_medians.py "$out/tsw_h${heads}_$v.txt" "h$heads $v"
  done
done
