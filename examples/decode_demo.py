"""One jit-compiled MLA decode step on random data, checked against the jnp reference.

DeepSeek-V3's per-GPU shape under 8-way tensor parallelism: 16 query heads over one
latent KV head (576 = 512 latent + 64 rope channels, V = the 512 latent ones), a paged
cache of 64-token blocks, two speculative tokens decoded causally.

    python examples/decode_demo.py [--batch 8] [--seqlen 4096]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_etap
from jax_etap.testing import random_paged_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--s-q", type=int, default=2)
    args = parser.parse_args()

    key_q, key_cache = jax.random.split(jax.random.key(0))
    q = jax.random.normal(key_q, (args.batch, args.s_q, args.heads, 576), jnp.bfloat16)
    # A pool with each sequence's blocks scattered at random, and ragged lengths.
    kv_cache, seqlens, block_table = random_paged_cache(key_cache, args.batch, args.seqlen, ragged=True)

    decode = jax.jit(lambda *a: jax_etap.mla_decode(*a, causal=True))
    reference = jax.jit(lambda *a: jax_etap.mla_decode(*a, causal=True, implementation="xla"))

    jax.block_until_ready(decode(q, kv_cache, seqlens, block_table))  # compile and warm up
    steps, times = 20, []
    for _ in range(steps):
        start = time.perf_counter()
        out, lse = jax.block_until_ready(decode(q, kv_cache, seqlens, block_table))
        times.append(time.perf_counter() - start)
    step_us = float(np.median(times)) * 1e6

    ref_out, ref_lse = reference(q, kv_cache, seqlens, block_table)
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    rel_err = np.linalg.norm(out32 - ref32) / np.linalg.norm(ref32)
    lse_err = float(np.max(np.abs(np.asarray(lse) - np.asarray(ref_lse))))

    ran = "CUDA kernel (etap)" if jax_etap.kernel_available() else "jnp reference (xla)"
    print(f"device:         {jax.devices()[0].device_kind}")
    print(f"implementation: {ran}")
    print(f"shapes:         q {tuple(q.shape)}, kv_cache {tuple(kv_cache.shape)}, seqlens {np.asarray(seqlens).tolist()}")
    print(f"decode step:    {step_us:.1f} us (median of {steps} jitted calls, dispatch included)")
    print(f"vs reference:   relative error {rel_err:.2e} (out), max |lse diff| {lse_err:.2e}")
    # bf16 outputs: rounding alone gives ~2e-3; see README "Accuracy".
    if not (rel_err < 1e-2 and lse_err < 1e-3):
        raise SystemExit("FAILED: the decode step disagrees with the reference")
    print("OK")


if __name__ == "__main__":
    main()
