#!/usr/bin/env bash
# One device call, once the package is installed (benchmarks/device_run.sh
# builds it): compute-sanitizer over small decode calls, the 10,000-step soak, and the
# numerics study, then a summary table last.
#   bash benchmarks/reliability_run.sh
# Everything goes to $OUT/reliability when OUT is set,
# else ./device_out/reliability: <step>.log for each step, sanitizer/ (the sanitizer's
# logs), soak/soak.csv, numerics/numerics.csv and numerics/numerics.png.
# Every step runs whatever the others did; the exit status is 0 only if all three passed.
# About 4-5 minutes on an H100: sanitizer <= 3 (its own limit), soak < 1, numerics ~1-2.
set -uo pipefail
out=${OUT:-device_out}/reliability
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

declare -A status seconds
run_step() {  # run_step NAME COMMAND...: tee the output to NAME.log, show its tail
  local name=$1
  shift
  echo "== $name"
  local began=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log" | tail -25
  status[$name]=${PIPESTATUS[0]}
  seconds[$name]=$((SECONDS - began))
}

run_step sanitizer "$python" "$here/sanitize.py" --out "$out/sanitizer"
run_step soak "$python" "$here/../tests/soak.py" --out "$out/soak"
run_step numerics "$python" "$here/numerics.py" --out "$out/numerics"

verdict() {  # verdict NAME: passed / FAILED / not run (no compute-sanitizer)
  case "${status[$1]}" in
    0) echo passed ;;
    2) [ "$1" = sanitizer ] && echo "not run" || echo FAILED ;;
    *) echo FAILED ;;
  esac
}
echo
echo "== reliability summary (logs in $out)"
echo "| step | result | seconds | summary |"
echo "|---|---|---|---|"
sanitizer_lines=$(grep -E '^(memcheck|racecheck|initcheck|synccheck) ' "$out/sanitizer.log" | sed 's/ \+/ /g' | paste -sd ';' -)
echo "| sanitizer | $(verdict sanitizer) | ${seconds[sanitizer]} | ${sanitizer_lines:-$(tail -1 "$out/sanitizer.log")} |"
echo "| soak | $(verdict soak) | ${seconds[soak]} | $(grep -E '^soak: ' "$out/soak.log" | tail -1) |"
echo "| numerics | $(verdict numerics) | ${seconds[numerics]} | $(grep -E '^numerics: done' "$out/numerics.log" | tail -1) |"
for step in sanitizer soak numerics; do
  [ "${status[$step]}" = 0 ] || exit 1
done
