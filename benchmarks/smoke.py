"""A fast first check of the CUDA kernels on a GPU, run before the test suite.

One call per kernel path (ETAP at N = 16/32 rows, the wide kernel at 64+ rows, block sizes
16/64/256, fp16, split and whole sequences, the portable kernel), each against the jnp
reference on the same GPU: prints the relative error and NaN count per case. It exists
so that a kernel that hangs or is badly wrong is seen within a minute (the device script
runs it under `timeout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jax_etap
from jax_etap.testing import random_paged_cache, relative_error

CASES = [
    # (batch, seqlen, h_q, s_q, block_size, dtype, implementation)
    (2, 100, 16, 1, 64, jnp.bfloat16, "cuda"),
    (3, 1000, 16, 2, 64, jnp.bfloat16, "cuda"),
    (2, 5000, 32, 1, 16, jnp.bfloat16, "cuda"),
    (2, 3000, 64, 1, 64, jnp.float16, "cuda"),
    (1, 70000, 16, 1, 64, jnp.bfloat16, "cuda"),
    (2, 3000, 128, 2, 256, jnp.bfloat16, "cuda"),
    (1, 70000, 128, 1, 64, jnp.bfloat16, "cuda"),
    (3, 1000, 16, 2, 64, jnp.bfloat16, "portable"),
]


def main() -> None:
    print(f"device: {jax.devices()[0].device_kind}; kernel available: {jax_etap.kernel_available()}", flush=True)
    failed = 0
    for i, (batch, seqlen, h_q, s_q, block_size, dtype, impl) in enumerate(CASES):
        key_q, key_cache = jax.random.split(jax.random.key(i))
        q = jax.random.normal(key_q, (batch, s_q, h_q, 576), dtype)
        kv, seqlens, table = random_paged_cache(key_cache, batch, seqlen, block_size=block_size, dtype=dtype, ragged=True)
        run = lambda implementation: jax.jit(  # noqa: E731
            lambda *a: jax_etap.mla_decode(*a, causal=True, implementation=implementation)
        )(q, kv, seqlens, table)
        out, lse = run(impl)
        ref_out, ref_lse = run("xla")
        out, ref_out = np.asarray(out, np.float64), np.asarray(ref_out, np.float64)
        rel = relative_error(out, ref_out)
        lse_err = np.nanmax(np.abs(np.asarray(lse) - np.asarray(ref_lse)))
        nans = int(np.isnan(out).sum())
        ok = rel < 1e-2 and lse_err < 1e-3 and nans == 0
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {impl:8s} b{batch} s{seqlen} h{h_q} sq{s_q} bs{block_size} "
              f"{jnp.dtype(dtype).name}: rel {rel:.2e}, lse {lse_err:.2e}, nan {nans}", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
