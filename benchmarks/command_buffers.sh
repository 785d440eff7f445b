#!/usr/bin/env bash
# Issue 4's CUDA-graph check, on the device: the jitted generation loop of
# examples/generate.py with XLA's command buffers on (the default) and off, its per-step
# time each way, and whether the optimised HLO puts the kernel's custom call inside a
# command buffer at all (a time with "on" means nothing unless it does).
#   bash benchmarks/command_buffers.sh [generate.py arguments]
# Logs and the optimised HLO of the loop go to $OUT/command_buffers (the device tool's return folder) when
# OUT is set, else ./device_out/command_buffers.
set -euo pipefail
out=${OUT:-device_out}/command_buffers
mkdir -p "$out"
args=${*:-"--layers 4 --batch 8 --new-tokens 256 --repeats 5"}
# shellcheck disable=SC2086
XLA_FLAGS="--xla_dump_to=$out/hlo --xla_dump_hlo_as_text" \
  python3 -P examples/generate.py $args --command-buffers on | tee "$out/on.log"
# shellcheck disable=SC2086
python3 -P examples/generate.py $args --command-buffers off | tee "$out/off.log"

echo "== where the kernel's custom calls sit (optimised HLO, command buffers on)"
python3 "$(dirname "$0")/hlo_placement.py" jax_etap_mla_decode "$out"/hlo/*after_optimizations.txt \
  | tee "$out/kernel_placement.txt"
# Keep the modules that call the kernel; the rest of the dump is hundreds of files.
{ grep -l 'custom_call_target="jax_etap_mla_decode' "$out"/hlo/*after_optimizations.txt || true; } | xargs -r cp -t "$out"
rm -rf "$out/hlo"
echo "| command buffers | per step |"
echo "|---|---|"
for mode in on off; do
  echo "| $mode | $(grep -oE '[0-9.]+ us/step' "$out/$mode.log") |"
done
