#!/usr/bin/env bash
# One device call for an A/B: the working tree against a variant of it (the tree with
# PATCH applied), built side by side; the smoke check and the GPU tests on the variant;
# the same benchmark for both; last, a table of the two, config by config.
#   bash benchmarks/ab_run.sh PATCH [--tests PYTEST_ARGS] [--bench BENCH_ARGS]
# The tree is installed as the package; the variant goes to a --target folder that is put
# first on PYTHONPATH for its runs. Without --tests only the smoke check runs on the
# variant. Logs and both CSVs go to $OUT/ab (the device tool's return folder), else
# ./device_out/ab. JAX_ETAP_CUDA (default ON) and AB_SMOKE=0 are for a CPU dry run.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PATCH [--tests PYTEST_ARGS] [--bench BENCH_ARGS]" >&2; exit 2; }
patch=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
shift
test_args=""
bench_args=""
while [ $# -gt 0 ]; do
  case $1 in
    --tests) test_args=$2; shift ;;
    --bench) bench_args=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
out=${OUT:-device_out}/ab
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PYTHONUNBUFFERED=1
cuda=${JAX_ETAP_CUDA:-ON}

# The variant's sources: the tree without its build outputs, with the patch applied.
mkdir "$tmp/src"
tar --exclude=./build --exclude=./device_out --exclude=./.git -cf - . | tar -xf - -C "$tmp/src"
(cd "$tmp/src" && git apply "$patch")

echo "== build (tree and variant, in parallel)"
JAX_ETAP_CUDA=$cuda python3 -m pip install --no-build-isolation --no-deps -v . >"$out/build_tree.log" 2>&1 &
tree_build=$!
JAX_ETAP_CUDA=$cuda python3 -m pip install --no-build-isolation --no-deps -v --target "$tmp/variant" "$tmp/src" \
  >"$out/build_variant.log" 2>&1 &
variant_build=$!
wait "$tree_build" || { tail -40 "$out/build_tree.log"; exit 1; }
wait "$variant_build" || { tail -40 "$out/build_variant.log"; exit 1; }
for build in tree variant; do
  echo "$build: $(grep -cE 'Potential Performance Loss' "$out/build_$build.log" || true) serialised-wgmma notes," \
    "$(grep -E 'spill stores' "$out/build_$build.log" | grep -vc ' 0 bytes spill stores' || true) spilling kernels"
done

variant() { PYTHONPATH="$tmp/variant${PYTHONPATH:+:$PYTHONPATH}" "$@"; }
variant python3 -P -c "import jax_etap; print('variant runs', jax_etap.__file__)"
if [ "${AB_SMOKE:-1}" = 1 ]; then
  echo "== smoke (variant)"
  variant timeout 120 python3 -P benchmarks/smoke.py 2>&1 | tee "$out/smoke.log" || { echo "SMOKE FAILED OR HUNG"; exit 1; }
fi
tests_status=0
if [ -n "$test_args" ]; then
  echo "== tests (variant)"
  eval variant timeout 420 python3 -P -m pytest -q -p no:cacheprovider "$test_args" 2>&1 | tee "$out/tests.log" | tail -15 \
    || tests_status=1
  grep -q -E "[0-9]+ (failed|error)" "$out/tests.log" && tests_status=1
fi

echo "== benchmark (tree, then variant)"
# shellcheck disable=SC2086
eval python3 -P -m jax_etap.bench "$bench_args" --csv "$out/tree.csv" >"$out/bench_tree.log" 2>&1 \
  || { tail -20 "$out/bench_tree.log"; exit 1; }
eval variant python3 -P -m jax_etap.bench "$bench_args" --csv "$out/variant.csv" >"$out/bench_variant.log" 2>&1 \
  || { tail -20 "$out/bench_variant.log"; exit 1; }
grep -E "^device" "$out/bench_tree.log" "$out/bench_variant.log" || true
python3 - "$out/tree.csv" "$out/variant.csv" <<'EOF'
import csv, sys
tree, variant = ({(r["config"], r["impl"]): r for r in csv.DictReader(open(path))} for path in sys.argv[1:])
gpu = all(r.get("gpu_us") for r in tree.values())
print("| config | impl | tree us | variant us | speedup |" + (" tree gpu us | variant gpu us | speedup |" if gpu else ""))
print("|---|---|---|---|---|" + ("---|---|---|" if gpu else ""))
for key, t in tree.items():
    v = variant.get(key)
    if v is None:
        continue
    row = f"| {key[0]} | {key[1]} | {float(t['time_us']):.1f} | {float(v['time_us']):.1f} | {float(t['time_us']) / float(v['time_us']):.3f}x |"
    if gpu:
        row += f" {float(t['gpu_us']):.1f} | {float(v['gpu_us']):.1f} | {float(t['gpu_us']) / float(v['gpu_us']):.3f}x |"
    print(row)
EOF
[ "$tests_status" = 0 ] || { echo "variant's GPU tests FAILED (see tests.log)"; exit 1; }
