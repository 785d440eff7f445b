#!/usr/bin/env bash
# Nsight Compute's view of one decode-kernel launch: where its warps stall, per section and
# per SASS instruction, and how busy each pipe is (ComputeWorkloadAnalysis: the tensor pipe's
# share, which the compute-bound rows are judged by). The clocks are left as the card runs them (--clock-control none)
# and, unless --cold, the caches too, as in a decoding loop where the last call left the
# kernel's code in L2.
#   bash benchmarks/launch_profile.sh [--cold] [--implementation cuda] [--kernel decode_sm90] BATCH SEQLEN HEADS S_Q
# Writes the report, the details page and the per-instruction CSV to $OUT/launch_profile
# (else ./device_out/launch_profile) and prints the stall summary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-device_out}/launch_profile
mkdir -p "$out"
cache=none
impl=etap
kernel=decode_sm90
while [ $# -gt 4 ]; do
  case $1 in
    --cold) cache=all ;;
    --implementation) impl=$2; shift ;;
    --kernel) kernel=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ $# -eq 4 ] || { echo "usage: $0 [--cold] [--implementation I] [--kernel K] BATCH SEQLEN HEADS S_Q" >&2; exit 2; }
read -r batch seqlen heads s_q <<<"$*"
name="b${batch}_s${seqlen}_h${heads}_sq${s_q}_${impl}_${kernel}_cache-${cache}"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
# The 4th launch: the first compiles, the next two warm the code and the L2.
"$ncu" --clock-control none --cache-control "$cache" --kernel-name "regex:$kernel" --launch-skip 3 --launch-count 1 \
  --section LaunchStats --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
  --section InstructionStats --section SourceCounters --import-source no -f -o "$out/$name" \
  python3 "$here/profile_kernel.py" --batch "$batch" --seqlen "$seqlen" --heads "$heads" --s-q "$s_q" \
  --implementation "$impl" --calls 5 >"$out/$name.log" 2>&1 || { tail -20 "$out/$name.log"; exit 1; }
"$ncu" --import "$out/$name.ncu-rep" --page details >"$out/$name.details.txt"
"$ncu" --import "$out/$name.ncu-rep" --page source --csv --print-source sass >"$out/$name.source.csv" 2>/dev/null || true
grep -E "Duration|Elapsed Cycles|SM Frequency|Warp Cycles Per Issued|No Eligible|Issued Warp|Stall|Registers|Waves|Pipe|Tensor" \
  "$out/$name.details.txt" | head -40
