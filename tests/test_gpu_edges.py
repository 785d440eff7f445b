"""Shapes at the edges, on the GPU: the CUDA kernel against the float64 oracle.

Complements test_gpu_kernel.py (the grid and the kernel's own corner cases) with the edges
of issue 5: batch 1 and 512; lengths 0, 1, 63, 64, 65 at block sizes 16, 64 and 256; causal
s_q 1 to 8; every query-head count from 1 to 128 at h_kv = 1; a KV pool of more than 2^31
elements of which the block table uses a few blocks; one sequence of 256K keys (slow).
Every cache slot that holds no token is NaN, so a read past a sequence's end shows.

Skipped unless ``jax_etap.kernel_available()``. Tolerances: see mla_cases.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import assert_matches_oracle, decode, make_case
from test_gpu_kernel import check_kernel

import jax_etap

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not jax_etap.kernel_available(), reason="the CUDA kernel cannot run here (no CUDA GPU or no CUDA build)"),
]


@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("seqlen", [0, 1, 63, 64, 65])
def test_batch_one(rng, seqlen, block_size):
    check_kernel(make_case(rng, seqlens=(seqlen,), s_q=2, h_q=16, causal=True, block_size=block_size, poison=np.nan))


def test_batch_512(rng):
    seqlens = rng.integers(0, 200, 512)
    seqlens[:6] = (0, 1, 63, 64, 65, 199)
    check_kernel(make_case(rng, seqlens=tuple(seqlens), capacity=200, s_q=2, h_q=16, causal=True, poison=np.nan))


@pytest.mark.parametrize("s_q,h_q", [(s_q, 16) for s_q in range(1, 9)] + [(8, 128), (5, 7)])
def test_causal_query_lengths(rng, s_q, h_q):
    """Lengths below, at and just past s_q leave rows that see no key or one key."""
    seqlens = (0, 1, max(s_q - 1, 2), s_q, 64, 65, 700)
    check_kernel(make_case(rng, seqlens=seqlens, s_q=s_q, h_q=h_q, causal=True, poison=np.nan))


@pytest.mark.parametrize("causal,s_q", [(False, 1), (True, 2)], ids=["sq1", "causal-sq2"])
def test_every_head_count(rng, causal, s_q):
    """h_q = 1..128 at h_kv = 1, every count the API accepts: every way the packed rows
    (s * h_q + h) fill the kernel's row tiles. Kernel vs oracle only (one compilation
    per head count); all failing counts are reported together."""
    failures = []
    for h_q in range(1, 129):
        case = make_case(rng, seqlens=(0, 1, 65, 130), s_q=s_q, h_q=h_q, causal=causal, poison=np.nan)
        try:
            assert_matches_oracle(*decode(case, "etap"), case)
        except AssertionError as err:
            failures.append(f"h_q={h_q}: {str(err).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@functools.partial(jax.jit, static_argnums=0)
def _nan_pool_holding(num_blocks: int, blocks: jax.Array, where: jax.Array) -> jax.Array:
    """A pool of ``num_blocks`` NaN blocks with ``blocks[j]`` written at block ``where[j]``."""
    pool = jnp.full((num_blocks, *blocks.shape[1:]), jnp.nan, blocks.dtype)
    return pool.at[where].set(blocks)


def test_pool_far_larger_than_the_table_uses(rng):
    """A 4.3 GB pool of more than 2^31 elements, NaN except the 16 blocks the table uses,
    four of them past element offset 2^31: offsets must be 64-bit, and nothing
    unreferenced may be read. Compared with the oracle on the 16 blocks alone."""
    block_size, d_qk = 64, 576
    num_blocks = 2**31 // (block_size * d_qk) + 8
    compact = make_case(rng, seqlens=(200, 64, 1, 0), capacity=256, s_q=2, h_q=16, causal=True, spare_blocks=0)
    n = compact.kv_cache.shape[0]
    middle = rng.choice(np.arange(2, num_blocks - 4), n - 6, replace=False)
    where = np.concatenate([[0, 1], middle, np.arange(num_blocks - 4, num_blocks)])
    assert (where[-4:].astype(np.int64) * block_size * d_qk >= 2**31).all()
    pool = _nan_pool_holding(num_blocks, compact.kv_cache, jnp.asarray(where, jnp.int32))
    table = jnp.asarray(where[np.asarray(compact.block_table)], jnp.int32)
    big = compact.replace(kv_cache=pool, block_table=table)
    for implementation in ("etap", "xla"):
        assert_matches_oracle(*decode(big, implementation), compact)


@pytest.mark.slow
def test_one_sequence_of_256k_keys(rng):
    check_kernel(make_case(rng, seqlens=(262144,), s_q=2, h_q=16, causal=True))
