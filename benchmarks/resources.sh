#!/usr/bin/env bash
# The compiler's resource report of each kernel (registers, spills, stack, barriers), any
# wgmma that ptxas serialises (its "Potential Performance Loss" notes: every wgmma of the
# kernel then waits for the one before), the warpgroup MMA count in its SASS (HGMMA: the
# Hopper kernels must be on wgmma) and its code size.
#   bash benchmarks/resources.sh [TREE]    (needs nvcc; cuobjdump + nvdisasm on PATH for the SASS count)
# TREE: a folder holding csrc/ (a patched copy, e.g. a diagnostic build); default this repository.
# tests/test_kernel_resources.py reads this report.
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Mangled kernel names -> kernel<type, template int>.
short() { sed -E 's/_ZN8jax_etap[^ :]*[0-9](decode_sm90_kernel|decode_sm90_wide_kernel|decode_sm80_kernel|combine_splits_kernel)I[0-9]*(__nv_bfloat16|__half)(Li([0-9]+))?[^ :]*/\1<\2 \4>/g'; }
for spec in sm90/decode_etap.cu:90a sm90/decode_wide.cu:90a sm80/decode_portable.cu:80 combine/combine_splits.cu:80; do
  src=${spec%%:*} arch=${spec##*:}
  echo "== csrc/$src (sm_$arch)"
  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas=-v -gencode="arch=compute_$arch,code=sm_$arch" -I csrc \
    -c "csrc/$src" -o "$tmp/k.o" >"$tmp/ptxas.txt" 2>&1 || { cat "$tmp/ptxas.txt"; exit 1; }
  grep -E "Compiling entry|stack frame|Used [0-9]+ registers" "$tmp/ptxas.txt" |
    sed -E "s/ptxas info *: //; s/Compiling entry function '([^']*)'.*/\1/" | short | paste - - - | tr -s ' \t' ' '
  grep "Potential Performance Loss" "$tmp/ptxas.txt" |
    sed -E "s/.*\((C[0-9]+)\) Potential Performance Loss: (.*) in (the )?function '([^']*)'.*/\4: serialised wgmma (\1): \2/" |
    short | sort -u || true
  if command -v cuobjdump >/dev/null; then
    # HGMMA count and code size (16 bytes an instruction): straight-line code runs cold from
    # the instruction cache once per launch, so its size is part of a launch's fixed cost.
    # R2UR inside a chain (after an HGMMA that does not close its group, gsb0): a
    # descriptor computed per thread and moved into uniform registers before each HGMMA,
    # which ptxas does not report; removing them gained 1.04-1.11x at 64+ rows (H200,
    # 2026-12-02, f8dd2f2).
    cuobjdump -sass "$tmp/k.o" | awk '/Function :/ {f=$3; open_chain=0}
      /HGMMA/ {n[f]++; open_chain = !/gsb0/} /R2UR/ && open_chain {moves[f]++}
      /^ +\/\*[0-9a-f]+\*\// {size[f] += 16}
      END {for (k in size) printf "%s: %d HGMMA, %d R2UR inside HGMMA chains, %.1f KiB of SASS\n", k, n[k], moves[k],
                                  size[k] / 1024}' | short
  fi
done
