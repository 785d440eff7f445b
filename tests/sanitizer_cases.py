"""Small decode calls for compute-sanitizer to watch (run by benchmarks/sanitize.py).

    python3 tests/sanitizer_cases.py [--implementation etap|xla|default]
    python3 tests/sanitizer_cases.py --control memcheck|racecheck|initcheck|synccheck

The default run makes a handful of small `mla_decode` calls that cover the kernels'
paths (bf16 and fp16; paged with 16- and 64-token blocks and dense; causal s_q 2; 16, 64
and 128 query heads, and 16 heads at s_q 2 for the ETAP kernel's 32-row tiles; a sequence
long enough to be split and combined; NaN in every cache slot past the sequences' ends;
an out-of-range block-table entry, and FlashMLA's trap value in the unused entries) and
checks each against the float64 oracle on the host, so nothing but the decode itself runs
on the GPU. It prints one line per case and a last line starting with
``sanitizer_cases: OK``; any mismatch exits non-zero.

``--control TOOL`` instead launches one deliberately broken CUDA kernel through CuPy, the
bug TOOL exists to find (an out-of-bounds read, a shared-memory race, a read of
uninitialised memory, a barrier half the block skips), named like our kernels, so that
sanitize.py can show that each tool does report a planted bug in this very setup.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from mla_cases import Case, assert_matches_oracle, decode, make_case

OK_MARKER = "sanitizer_cases: OK"
FLASHMLA_UNUSED_ENTRY = 2147480000


@dataclasses.dataclass(frozen=True)
class SanitizerCase:
    """A make_case spec, optionally with a bad used block-table entry in sequence 1."""

    name: str
    spec: dict
    bad_block: bool = False

    def build(self, rng: np.random.Generator) -> Case:
        case = make_case(rng, poison=np.nan, **self.spec)
        if not self.bad_block:
            return case
        table = np.asarray(case.block_table).copy()
        block_size = case.kv_cache.shape[1]
        for b, n in enumerate(np.clip(self.spec["seqlens"], 0, None)):
            table[b, -(-n // block_size):] = FLASHMLA_UNUSED_ENTRY  # unused: never looked at
        table[1, 0] = -1  # used: sequence 1 reads as NaN, nothing is dereferenced
        return case.replace(block_table=jnp.asarray(table, jnp.int32))


CASES = [
    SanitizerCase("bf16-paged64-h16", dict(seqlens=(0, 1, 63, 64, 65, 130), h_q=16, block_size=64)),
    SanitizerCase("fp16-paged16-h64-causal2",
                  dict(seqlens=(3, 100, 17, 0), h_q=64, block_size=16, s_q=2, causal=True, dtype=jnp.float16)),
    SanitizerCase("bf16-dense-h128-causal2",
                  dict(seqlens=(0, 70, 129), capacity=130, h_q=128, block_size=None, s_q=2, causal=True)),
    # 32 packed rows: the ETAP kernel's N = 32 tiles (one-term P), with a split sequence.
    SanitizerCase("bf16-paged64-h16-causal2-split", dict(seqlens=(5000, 3, 64), h_q=16, s_q=2, causal=True,
                                                         block_size=64)),
    SanitizerCase("bf16-paged64-h16-bad-block", dict(seqlens=(40, 150, 64), h_q=16, block_size=64), bad_block=True),
    SanitizerCase("fp16-paged64-h128-split", dict(seqlens=(3000, 5), h_q=128, block_size=64, dtype=jnp.float16)),
    SanitizerCase("bf16-paged16-d128-hkv2-causal3",
                  dict(seqlens=(50, 2, 33), h_q=6, h_kv=2, d_qk=128, head_dim_v=64, s_q=3, causal=True, block_size=16)),
]


def run_cases(implementation: str | None) -> None:
    """Every case through `mla_decode`, checked against the float64 oracle."""
    rng = np.random.default_rng(2026)
    for case in CASES:
        built = case.build(rng)
        assert_matches_oracle(*decode(built, implementation), built)
        print(f"ok {case.name}", flush=True)
    print(f"{OK_MARKER}: {len(CASES)} cases match the float64 oracle "
          f"(implementation={implementation or 'default'}, device={jax.devices()[0]})", flush=True)


# Planted bugs, one per tool, each named like our kernels so that sanitize.py attributes
# them to us (the point is to show that a bug in a kernel of ours would be reported).
CONTROL_KERNELS = r"""
extern "C" __global__ void etap_control_out_of_bounds(const float* x, float* y, int n) {
  y[threadIdx.x] = x[threadIdx.x + n];  // n = len(x): every read is past the end
}
extern "C" __global__ void etap_control_race(float* y) {
  __shared__ float s[64];
  s[threadIdx.x] = threadIdx.x;
  y[threadIdx.x] = s[(threadIdx.x + 32) % 64];  // no __syncthreads: the other warp's write
}
extern "C" __global__ void etap_control_uninitialised(const float* x, float* y) {
  y[threadIdx.x] = x[threadIdx.x];  // x was allocated and never written
}
extern "C" __global__ void etap_control_divergent_barrier(float* y) {
  if (threadIdx.x < 32) __syncthreads();  // half the block never reaches the barrier
  y[threadIdx.x] = 1.0f;
}
"""
CONTROL_BUGS = {
    "memcheck": "etap_control_out_of_bounds",
    "racecheck": "etap_control_race",
    "initcheck": "etap_control_uninitialised",
    "synccheck": "etap_control_divergent_barrier",
}


def run_control(tool: str) -> None:
    """Launches the planted bug that ``tool`` should report (needs CuPy; exits 3 without it)."""
    try:
        import cupy
    except ImportError:
        print("sanitizer_cases: CuPy is not installed; no control run", flush=True)
        raise SystemExit(3) from None
    cupy.cuda.set_allocator(None)  # one cudaMalloc per array: the sanitizer sees exact bounds
    kernel = cupy.RawModule(code=CONTROL_KERNELS).get_function(CONTROL_BUGS[tool])
    x = cupy.ones(64, cupy.float32)
    y = cupy.empty(64, cupy.float32)
    arguments = {
        "memcheck": (x, y, np.int32(64)),
        "racecheck": (y,),
        "initcheck": (cupy.empty(64, cupy.float32), y),
        "synccheck": (y,),
    }[tool]
    kernel((1,), (64,), arguments)
    cupy.cuda.runtime.deviceSynchronize()
    print(f"sanitizer_cases: control kernel {CONTROL_BUGS[tool]} launched", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--implementation", choices=["cuda", "xla", "default"], default="cuda")
    parser.add_argument("--control", choices=sorted(CONTROL_BUGS), help="launch this tool's planted bug instead")
    args = parser.parse_args(argv)
    if args.control:
        run_control(args.control)
    else:
        run_cases(None if args.implementation == "default" else args.implementation)


if __name__ == "__main__":
    main()
