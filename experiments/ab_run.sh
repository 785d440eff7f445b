#!/usr/bin/env bash
# One device call for an A/B: the working tree against one or more variants of it (the
# tree with PATCH applied), all built side by side; the smoke check and the GPU tests on
# each variant; the same benchmark for all; last, a table of them, config by config.
#   bash experiments/ab_run.sh PATCH [PATCH ...] [--tests PYTEST_ARGS] [--bench BENCH_ARGS]
# A variant is named after its patch's file (kv_multicast.patch: kv_multicast); A.patch+B.patch
# is one variant with both applied in that order, named A__B. The tree is
# installed as the package; each variant goes to a --target folder that is put first on
# PYTHONPATH for its runs. Without --tests only the smoke check runs on the variants. The
# CSVs (<build>.csv) and logs.tar.gz (every log) go to $OUT/ab (a return
# folder, which brings back at most 8 files), else ./device_out/ab.
# JAX_ETAP_CUDA (default ON) is for a CPU dry run; AB_SMOKE=0 skips the smoke check, for a
# CPU dry run and for the measurement patches whose outputs are meaningless (no_refill).
set -euo pipefail
. "$(dirname "$0")/../benchmarks/pytest_log.sh"
. "$(dirname "$0")/patched_build.sh"
usage="usage: $0 PATCH [PATCH ...] [--tests PYTEST_ARGS] [--bench BENCH_ARGS]"
patches=()  # per variant, its patches' absolute paths joined by +
names=()
test_args=""
bench_args=""
while [ $# -gt 0 ]; do
  case $1 in
    --tests) test_args=$2; shift ;;
    --bench) bench_args=$2; shift ;;
    -*) echo "unknown argument $1" >&2; exit 2 ;;
    *)
      spec="" name=""
      IFS=+ read -r -a parts <<<"$1"
      for part in "${parts[@]}"; do
        spec+="${spec:++}$(cd "$(dirname "$part")" && pwd)/$(basename "$part")"
        name+="${name:+__}$(basename "$part" .patch)"
      done
      patches+=("$spec")
      names+=("$name") ;;
  esac
  shift
done
[ ${#patches[@]} -ge 1 ] || { echo "$usage" >&2; exit 2; }
cd "$(dirname "$0")/.."
out=${OUT:-device_out}/ab
mkdir -p "$out"
tmp=$(mktemp -d)
finish() {  # the logs in one archive, however the script ends
  (cd "$out" && tar -czf logs.tar.gz -- *.log && rm -f -- *.log) 2>/dev/null || true
  rm -rf "$tmp"
}
trap finish EXIT
export PYTHONUNBUFFERED=1
cuda=${JAX_ETAP_CUDA:-ON}
builds=(tree "${names[@]}")

echo "== build (tree and ${names[*]}, in parallel)"
JAX_ETAP_CUDA=$cuda python3 -m pip install --no-build-isolation --no-deps -v . >"$out/build_tree.log" 2>&1 &
pids=("$!")
for i in "${!patches[@]}"; do
  IFS=+ read -r -a parts <<<"${patches[$i]}"
  JAX_ETAP_CUDA=$cuda start_patched_build "$tmp/src_${names[$i]}" "$tmp/${names[$i]}" "$out/build_${names[$i]}.log" \
    "${parts[@]}"
  pids+=("$!")
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { tail -40 "$out/build_${builds[$i]}.log"; exit 1; }
done
for build in "${builds[@]}"; do
  echo "$build: $(grep -cE 'Potential Performance Loss' "$out/build_$build.log" || true) serialised-wgmma notes," \
    "$(grep -E 'spill stores' "$out/build_$build.log" | grep -vc ' 0 bytes spill stores' || true) spilling kernels"
done

in_build() {  # in_build NAME COMMAND...: run COMMAND with build NAME's package first on the path
  local name=$1
  shift
  if [ "$name" = tree ]; then "$@"; else PYTHONPATH="$tmp/$name${PYTHONPATH:+:$PYTHONPATH}" "$@"; fi
}
tests_status=0
for name in "${names[@]}"; do
  in_build "$name" python3 -P -c "import jax_etap; print('$name runs', jax_etap.__file__)"
  if [ "${AB_SMOKE:-1}" = 1 ]; then
    echo "== smoke ($name)"
    in_build "$name" timeout 120 python3 benchmarks/smoke.py 2>&1 | tee "$out/smoke_$name.log" \
      || { echo "SMOKE FAILED OR HUNG ($name)"; exit 1; }
  fi
  if [ -n "$test_args" ]; then
    echo "== tests ($name)"
    eval in_build "$name" timeout 420 python3 -P -m pytest -q -p no:cacheprovider "$test_args" 2>&1 \
      | tee "$out/tests_$name.log" | tail -15 || tests_status=1
    pytest_log_ok "$out/tests_$name.log" || tests_status=1
  fi
done

echo "== benchmark (tree, then ${names[*]})"
for build in "${builds[@]}"; do
  # shellcheck disable=SC2086
  eval in_build "$build" python3 benchmarks/bench.py "$bench_args" --csv "$out/$build.csv" >"$out/bench_$build.log" 2>&1 \
    || { tail -20 "$out/bench_$build.log"; exit 1; }
  grep -E "^device" "$out/bench_$build.log" | sed "s/^/$build: /" || true
done
python3 - "$out" "${builds[@]}" <<'EOF'
import csv, os, sys
out, *builds = sys.argv[1:]
rows = {b: {(r["config"], r["impl"]): r for r in csv.DictReader(open(os.path.join(out, b + ".csv")))} for b in builds}
tree, variants = rows["tree"], builds[1:]
gpu = all(r.get("gpu_us") for r in tree.values())
columns = ["wall_us"] + (["gpu_us"] if gpu else [])
header = ["config", "impl"]
for column in columns:
    kind = "wall" if column == "wall_us" else "gpu"
    header.append(f"tree {kind} us")
    for v in variants:
        header += [f"{v} {kind} us", "x"]
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for key, t in tree.items():
    cells = [key[0], key[1]]
    for column in columns:
        cells.append(f"{float(t[column]):.1f}")
        for v in variants:
            r = rows[v].get(key)
            cells += [f"{float(r[column]):.1f}", f"{float(t[column]) / float(r[column]):.3f}x"] if r else ["-", "-"]
    print("| " + " | ".join(cells) + " |")
EOF
[ "$tests_status" = 0 ] || { echo "a variant's GPU tests FAILED (see tests_*.log)"; exit 1; }
