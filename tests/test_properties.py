"""Property-based checks (hypothesis).

* Random shapes, layouts and lengths against the float64 oracle: a few examples only
  (each is a new compilation); the grid in test_reference.py is the systematic coverage.
* The semantics of `mla_decode` as properties, at one fixed small problem shape so that
  every example after the first reuses its compilation, with fresh random values, lengths
  (negative to past the capacity) and layouts per example:
    - a paged cache equals the dense cache of the same tokens, bit for bit whatever order
      the blocks lie in the pool;
    - causal query row i equals a non-causal call over the first seqlen - s_q + i + 1 keys;
    - lse is the logsumexp of the scaled scores, computed independently in float64, and it
      is the normaliser of the returned output;
    - nothing past a sequence's end (NaN, inf, huge values, junk block-table entries)
      changes a single bit of the result.
  They run for the jnp reference, and for the CUDA kernel where it can run.
Tolerances: see mla_cases, and LSE_CONSISTENCY_TOL below.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import (
    OUT_RTOL,
    assert_matches_oracle,
    assert_same_result,
    decode,
    make_case,
    relative_error,
    to_f32,
)

import jax_etap

pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _specs(draw):
    d_qk = draw(st.sampled_from([64, 128, 192, 576]))
    h_kv = draw(st.sampled_from([1, 2]))
    h_q = h_kv * draw(st.sampled_from([1, 2, 3, 8]))
    batch = draw(st.integers(1, 4))
    capacity = draw(st.integers(1, 200))
    return dict(
        d_qk=d_qk,
        head_dim_v=draw(st.integers(1, d_qk)),
        h_kv=h_kv,
        h_q=h_q,
        s_q=draw(st.integers(1, 4)),
        causal=draw(st.booleans()),
        block_size=draw(st.sampled_from([16, 32, 64, None])),
        capacity=capacity,
        # Lengths from negative to past the capacity: clamped to [0, capacity].
        seqlens=tuple(draw(st.lists(st.integers(-3, capacity + 20), min_size=batch, max_size=batch))),
        dtype=draw(st.sampled_from([jnp.bfloat16, jnp.float16])),
        softmax_scale=draw(st.sampled_from([None, 0.05, 0.2])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs())
def test_random_problems_match_oracle(spec):
    seed = spec.pop("seed")
    case = make_case(np.random.default_rng(seed), **spec)
    for implementation in ("xla", None):
        out, lse = decode(case, implementation)
        assert_matches_oracle(out, lse, case)


# The fixed problem of the semantic properties: 3 sequences of up to 64 tokens in 16-token
# blocks (4 per sequence, 3 spare blocks in the pool), 3 query positions, 4 query heads
# over 2 KV heads, V the first 32 of 64 channels.
BATCH, S_Q, CAPACITY, BLOCK = 3, 3, 64, 16
SHAPE = dict(h_q=4, h_kv=2, d_qk=64, head_dim_v=32, s_q=S_Q, block_size=BLOCK, capacity=CAPACITY, spare_blocks=3)
POOL_BLOCKS = BATCH * CAPACITY // BLOCK + 3

SEEDS = st.integers(0, 2**32 - 1)
LENGTHS = st.lists(st.integers(-3, CAPACITY + 8), min_size=BATCH, max_size=BATCH).map(tuple)
SEMANTIC_IMPLEMENTATIONS = pytest.mark.parametrize(
    "implementation", ["xla"] + (["etap"] if jax_etap.kernel_available() else [])
)
semantic_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# lse against the float64 logsumexp, relative to max(1, |lse|). Both implementations
# accumulate 64 products of bf16 values in float32: a score is off by ~1e-5 at most here
# (|scores| up to ~50 at scale 2), 1e-7 relative to lse; a wrong scale, log base or key
# set is off by far more than 1e-5.
LSE_CONSISTENCY_TOL = 1e-5


def _problem(seed: int, seqlens: tuple, **changes):
    return make_case(np.random.default_rng(seed), seqlens=seqlens, **{**SHAPE, **changes})


def _assert_identical(a, b) -> None:
    """Equal results: every out and lse value equal (NaN matching NaN)."""
    np.testing.assert_array_equal(to_f32(a[0]), to_f32(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def _clamped(seqlens: tuple) -> np.ndarray:
    return np.clip(np.asarray(seqlens, np.int64), 0, CAPACITY)


@SEMANTIC_IMPLEMENTATIONS
@semantic_settings
@given(seed=SEEDS, seqlens=LENGTHS, causal=st.booleans(), order=st.permutations(range(POOL_BLOCKS)))
def test_paged_equals_dense_whatever_the_block_order(implementation, seed, seqlens, causal, order):
    case = _problem(seed, seqlens, causal=causal)
    pool, table = to_f32(case.kv_cache), np.asarray(case.block_table)
    # Block i of the pool moves to position inverse[i]: the same tokens, laid out anew.
    order = np.asarray(order)
    inverse = np.argsort(order)
    moved = case.replace(kv_cache=jnp.asarray(pool[order], case.dtype),
                         block_table=jnp.asarray(inverse[table], jnp.int32))
    dense_kv = pool[table].reshape(BATCH, CAPACITY, *pool.shape[2:])
    dense = case.replace(kv_cache=jnp.asarray(dense_kv, case.dtype), block_table=None)
    result = decode(case, implementation)
    _assert_identical(decode(moved, implementation), result)
    assert_same_result(decode(dense, implementation), result)


@SEMANTIC_IMPLEMENTATIONS
@semantic_settings
@given(seed=SEEDS, seqlens=LENGTHS)
def test_causal_row_is_a_shorter_non_causal_call(implementation, seed, seqlens):
    case = _problem(seed, seqlens, causal=True)
    out, lse = decode(case, implementation)
    for i in range(S_Q):
        # Negative lengths clamp to 0: a row that sees no key is an empty non-causal call.
        lengths = jnp.asarray(_clamped(seqlens) - S_Q + i + 1, jnp.int32)
        row = case.replace(q=case.q[:, i : i + 1], cache_seqlens=lengths, causal=False)
        assert_same_result((out[:, i : i + 1], lse[:, :, i : i + 1]), decode(row, implementation))


@SEMANTIC_IMPLEMENTATIONS
@semantic_settings
@given(seed=SEEDS, seqlens=LENGTHS, causal=st.booleans(), scale=st.sampled_from([0.05, 0.5, 2.0]))
def test_lse_is_the_logsumexp_of_the_scaled_scores(implementation, seed, seqlens, causal, scale):
    case = _problem(seed, seqlens, causal=causal, softmax_scale=scale)
    out, lse = decode(case, implementation)
    out, lse = to_f32(out).astype(np.float64), np.asarray(lse, np.float64)
    q, pool, _, table = case.numpy_args()
    h_q, h_kv, d_v = SHAPE["h_q"], SHAPE["h_kv"], SHAPE["head_dim_v"]
    # [b, kv head, token, channel], and the KV head of each query head.
    keys = pool[table].reshape(BATCH, CAPACITY, h_kv, -1).transpose(0, 2, 1, 3).astype(np.float64)
    kv_head = np.arange(h_q) // (h_q // h_kv)
    for b, length in enumerate(_clamped(seqlens)):
        for i in range(S_Q):
            seen = length - S_Q + i + 1 if causal else length
            if seen <= 0:
                assert np.isneginf(lse[b, :, i]).all() and (out[b, i] == 0).all()
                continue
            k = keys[b, kv_head, :seen]  # [h_q, seen, d]
            scores = scale * np.einsum("hd,hnd->hn", q[b, i].astype(np.float64), k)
            expected = np.logaddexp.reduce(scores, axis=-1)
            err = np.abs(lse[b, :, i] - expected) / np.maximum(1.0, np.abs(expected))
            assert err.max() <= LSE_CONSISTENCY_TOL, f"lse off by {err.max():.2e} (b={b}, row {i})"
            # The returned lse normalises the returned output: out = sum_k exp(s_k - lse) v_k.
            weights = np.exp(scores - lse[b, :, i, None])
            implied = np.einsum("hn,hnd->hd", weights, k[..., :d_v])
            assert relative_error(out[b, i], implied) <= OUT_RTOL[case.dtype]


GARBAGE = [np.nan, np.inf, -np.inf, 6e4, -6e4]


@SEMANTIC_IMPLEMENTATIONS
@semantic_settings
@given(
    seed=SEEDS,
    seqlens=LENGTHS,
    causal=st.booleans(),
    garbage=st.sampled_from(GARBAGE),
    junk=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=CAPACITY // BLOCK, max_size=CAPACITY // BLOCK),
)
def test_nothing_past_seqlen_reaches_the_output(implementation, seed, seqlens, causal, garbage, junk):
    """The same tokens with garbage in every cache slot that holds none (past each end, in
    unreferenced blocks) and junk in every block-table entry past the used blocks (any
    int32, in range or not): the result is identical to the clean one."""
    clean = _problem(seed, seqlens, causal=causal)
    dirty = _problem(seed, seqlens, causal=causal, poison=garbage)  # same draws, then poisoned
    table = np.asarray(dirty.block_table).copy()
    unused = np.arange(table.shape[1])[None, :] >= -(-_clamped(seqlens)[:, None] // BLOCK)
    table[unused] = np.broadcast_to(np.asarray(junk), table.shape)[unused]
    dirty = dirty.replace(block_table=jnp.asarray(table, jnp.int32))
    assert not np.array_equal(to_f32(dirty.kv_cache), to_f32(clean.kv_cache), equal_nan=True)
    _assert_identical(decode(dirty, implementation), decode(clean, implementation))
