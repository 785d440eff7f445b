#!/usr/bin/env bash
# Issue 4's CUDA-graph check, on the device: the jitted generation loop of
# examples/generate.py with XLA's command buffers on (the default) and off, its per-step
# time each way, and what XLA captured into command buffers (the loop, and with it the
# kernel's custom calls, or not: a time with "on" means little unless they are in).
#   bash benchmarks/command_buffers.sh [generate.py arguments]
# Logs go to $OUT/command_buffers when
# OUT is set, else ./device_out/command_buffers.
set -euo pipefail
out=${OUT:-device_out}/command_buffers
mkdir -p "$out"
args=${*:-"--layers 4 --batch 8 --new-tokens 256 --repeats 5"}
# The conversion pass's log names what each command buffer captured (see command_buffer_log.py).
# shellcheck disable=SC2086
TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_conversion_pass=2 \
  python3 -P examples/generate.py $args --command-buffers on 2>"$out/on.stderr" | tee "$out/on.log"
# shellcheck disable=SC2086
python3 -P examples/generate.py $args --command-buffers off | tee "$out/off.log"

echo "== command buffers formed with them on"
python3 "$(dirname "$0")/command_buffer_log.py" "$out/on.stderr" | tee "$out/command_buffers.txt"
echo "| command buffers | per step |"
echo "|---|---|"
for mode in on off; do
  echo "| $mode | $(grep -oE '[0-9.]+ us/step' "$out/$mode.log") |"
done
