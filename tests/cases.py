"""Random decode problems shared by the CPU and GPU tests (fresh random inputs, never zeros)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jax_etap

# Tolerances, against the float64 oracle evaluated on the same rounded inputs. Both
# implementations compute in float32 and round the output once (the kernel also rounds P
# to the input dtype before P.V, as FlashAttention does): bf16's 8-bit mantissa gives
# a relative error of ~2-4e-3, fp16's 11-bit one ~3-5e-4. The bounds leave ~3x margin and
# stay far below what an indexing or masking bug produces (errors of order 1).
OUT_RTOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
LSE_ATOL = 1e-3  # lse is float32 throughout; relative to max(1, |lse|)


@dataclass
class Problem:
    q: jnp.ndarray
    kv_cache: jnp.ndarray
    seqlens: jnp.ndarray
    block_table: jnp.ndarray | None
    head_dim_v: int


def make_problem(seed, *, batch=2, s_q=1, h_q=16, h_kv=1, d_qk=576, head_dim_v=512, lens=(100, 300),
                 block_size=64, paged=True, dtype=jnp.bfloat16, spare_blocks=3, fill_past_end=None, capacity=None):
    """A paged (blocks shuffled over a pool larger than needed) or dense cache problem.

    fill_past_end: a value (e.g. NaN) written into every cache slot past each sequence's end.
    capacity: tokens per sequence the cache holds; by default the longest of ``lens``.
    """
    rng = np.random.default_rng(seed)
    capacity = max(max(lens), 1) if capacity is None else capacity
    capacity_blocks = max(1, -(-capacity // block_size))
    q = jnp.asarray(rng.standard_normal((batch, s_q, h_q, d_qk)), dtype)
    if paged:
        num_blocks = batch * capacity_blocks + spare_blocks
        kv = rng.standard_normal((num_blocks, block_size, h_kv, d_qk))
        table = rng.permutation(num_blocks)[: batch * capacity_blocks].reshape(batch, capacity_blocks)
        if fill_past_end is not None:
            for b, n in enumerate(lens):
                flat = kv[table[b]].reshape(-1, h_kv, d_qk)
                flat[max(n, 0):] = fill_past_end
                kv[table[b]] = flat.reshape(capacity_blocks, block_size, h_kv, d_qk)
            used = set(table.ravel().tolist())
            for blk in range(num_blocks):
                if blk not in used:
                    kv[blk] = fill_past_end
        block_table = jnp.asarray(table, jnp.int32)
    else:
        kv = rng.standard_normal((batch, capacity_blocks * block_size, h_kv, d_qk))
        if fill_past_end is not None:
            for b, n in enumerate(lens):
                kv[b, max(n, 0):] = fill_past_end
        block_table = None
    return Problem(q, jnp.asarray(kv, dtype), jnp.asarray(lens, jnp.int32), block_table, head_dim_v)


def as_numpy(p: Problem):
    table = None if p.block_table is None else np.asarray(p.block_table)
    return (np.asarray(p.q.astype(jnp.float32)), np.asarray(p.kv_cache.astype(jnp.float32)), np.asarray(p.seqlens), table)


def assert_matches_oracle(out, lse, expected_out, expected_lse, dtype):
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    lse = np.asarray(lse, np.float64)
    # NaN and -inf exactly where the oracle has them (bad blocks, empty rows).
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected_out))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(expected_lse))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    if finite.any():
        err = np.abs(lse[finite] - expected_lse[finite]) / np.maximum(1.0, np.abs(expected_lse[finite]))
        assert err.max() <= LSE_ATOL, f"lse error {err.max():.2e}"
    ok = ~np.isnan(expected_out)
    if np.linalg.norm(expected_out[ok]) > 0:
        rel = np.linalg.norm(out[ok] - expected_out[ok]) / np.linalg.norm(expected_out[ok])
        assert rel <= OUT_RTOL[dtype], f"relative error {rel:.2e} > {OUT_RTOL[dtype]}"
    # Empty rows are exactly zero.
    empty = np.isneginf(expected_lse)  # [b, h, s]
    np.testing.assert_array_equal(out[np.transpose(empty, (0, 2, 1))], 0.0)


def decode(problem: Problem, implementation, **kwargs):
    """mla_decode of a problem under jit."""
    fn = jax.jit(
        lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, head_dim_v=problem.head_dim_v, implementation=implementation, **kwargs)
    )
    return fn(problem.q, problem.kv_cache, problem.seqlens, problem.block_table)
