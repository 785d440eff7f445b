#!/usr/bin/env bash
# GPU time of each kernel launch of one decode call (decode kernel, combine), per config,
# from Nsight Compute: set against the per-call time of the benchmark's chained program,
# it separates what the kernels take from what lies between them.
#   bash benchmarks/kernel_times.sh [IMPLEMENTATION] ["BATCH SEQLEN HEADS S_Q" ...]
# The clocks are left as the card runs them (--clock-control none: the benchmark never sets them); ncu flushes the
# caches before each launch. Needs ncu on PATH (or /usr/local/cuda/bin). Raw CSVs go to
# $OUT/kernel_times (else ./device_out).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-device_out}/kernel_times
mkdir -p "$out"
impl=${1:-etap}
shift || true
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=("128 4096 16 1" "16 65536 16 1" "128 8192 128 1" "1 65536 16 1" "1 1024 16 1")
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
echo "| config | impl | kernel | us (median of 3 calls) |"
echo "|---|---|---|---|"
for cfg in "${configs[@]}"; do
  read -r batch seqlen heads s_q <<<"$cfg"
  csv="$out/b${batch}_s${seqlen}_h${heads}_sq${s_q}_${impl}.csv"
  # The first call compiles and the second warms up; the last 3 are measured.
  "$ncu" --clock-control none --csv --metrics gpu__time_duration.sum \
    --kernel-name regex:'decode_sm|combine_splits' python3 "$here/profile_kernel.py" --batch "$batch" --seqlen "$seqlen" \
    --heads "$heads" --s-q "$s_q" --implementation "$impl" --calls 5 >"$csv" 2>"$csv.log" || { tail -5 "$csv.log"; continue; }
  python3 - "$csv" "b$batch s$seqlen h$heads sq$s_q" "$impl" <<'PY' || echo "| b$batch s$seqlen h$heads sq$s_q | $impl | (unreadable: $csv) | |"
import csv, re, statistics, sys
rows = [r for r in csv.DictReader(line for line in open(sys.argv[1]) if line.startswith('"'))]
times = {}
for r in rows:
    name = re.search(r"(decode_sm\w+|combine_splits\w*)(<[^>(]*>)?", r["Kernel Name"]).group(0)
    unit = r["Metric Unit"]
    value = float(r["Metric Value"].replace(",", "")) * {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[unit]
    times.setdefault(name, []).append(value)
for name, values in times.items():
    print(f"| {sys.argv[2]} | {sys.argv[3]} | {name} | {statistics.median(values[-3:]):.1f} |")
PY
done
