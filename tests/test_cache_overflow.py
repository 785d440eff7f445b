"""Cache overflow is visible: a sequence that lost tokens decodes to NaN until reset.

Through `jax_etap.cache` (append marks `overflowed`, `decode_block_table` turns the mark
into mla_decode's NaN convention, reset clears it) and through the Flax layer (decode
after an overflowing append or prefill gives NaN for that sequence only). Clamped
inputs: negative and over-capacity lengths in the cache, negative and too-large
num_new. Verified: with append's overflow mark removed (``overflowed=cache.overflowed``)
every test here fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import to_f32

import jax_etap
from jax_etap.cache import PagedKVCache, append, create_cache, reset

D = 64


def _rows(rng, batch, s_new):
    return jnp.asarray(rng.standard_normal((batch, s_new, 1, D)), jnp.bfloat16)


def _decode(cache, q):
    return jax.jit(lambda q, c: jax_etap.mla_decode(q, c.pages, c.seqlens, c.decode_block_table, head_dim_v=D))(q, cache)


def test_overflow_marks_the_sequence_and_its_outputs_are_nan(rng):
    cache = create_cache(3, 10, block_size=4, head_dim=D)  # capacity 12
    cache = jax.jit(append)(cache, _rows(rng, 3, 12), jnp.asarray([10, 3, 12], jnp.int32))
    np.testing.assert_array_equal(cache.overflowed, [False, False, False])  # exactly full is no overflow
    cache = jax.jit(append)(cache, _rows(rng, 3, 3))  # sequence 0: 10 + 3 > 12; sequence 2: 12 + 3
    np.testing.assert_array_equal(cache.overflowed, [True, False, True])
    np.testing.assert_array_equal(cache.seqlens, [12, 6, 12])
    out, lse = _decode(cache, jnp.asarray(rng.standard_normal((3, 1, 2, D)), jnp.bfloat16))
    out, lse = to_f32(out), np.asarray(lse)
    assert np.isnan(out[[0, 2]]).all() and np.isnan(lse[[0, 2]]).all()
    assert np.isfinite(out[1]).all() and np.isfinite(lse[1]).all()
    # The mark stays through later appends, and reset clears it.
    cache = append(cache, _rows(rng, 3, 1), jnp.asarray([0, 1, 0], jnp.int32))
    np.testing.assert_array_equal(cache.overflowed, [True, False, True])
    cache = jax.jit(reset)(cache, jnp.asarray([True, False, False]))
    np.testing.assert_array_equal(cache.overflowed, [False, False, True])
    np.testing.assert_array_equal(cache.decode_block_table[:2], cache.block_table[:2])
    assert int(cache.decode_block_table[2, 0]) == -1


def test_clamped_inputs(rng):
    """Lengths outside [0, capacity] are read as mla_decode reads them (clamped), and
    num_new is clamped to [0, s_new]: a negative length appends from 0, an over-capacity
    one is full (so appending to it overflows), a negative num_new appends nothing."""
    cache = create_cache(4, 8, block_size=4, head_dim=D)  # capacity 8
    cache = PagedKVCache(cache.pages, cache.block_table, jnp.asarray([-5, 100, 3, 2], jnp.int32))
    rows = _rows(rng, 4, 3)
    cache = append(cache, rows, jnp.asarray([2, 1, -4, 9], jnp.int32))
    np.testing.assert_array_equal(cache.seqlens, [2, 8, 3, 5])
    np.testing.assert_array_equal(cache.overflowed, [False, True, False, False])
    pages, rows = to_f32(cache.pages), to_f32(rows)  # table [[0, 1], [2, 3], [4, 5], [6, 7]]
    np.testing.assert_array_equal(pages[0, :2], rows[0, :2])  # sequence 0 from position 0
    np.testing.assert_array_equal(pages[6, 2:], rows[3, :2])  # sequence 3: 3 of 9 tokens, at 2, 3, 4
    np.testing.assert_array_equal(pages[7, 0], rows[3, 2])
    assert (pages[2:6] == 0).all()  # sequences 1 (full) and 2 (num_new < 0) wrote nothing


def test_overflow_inside_scan(rng):
    """Decode steps in lax.scan past the capacity: the step that overflows and every later
    one give NaN for that sequence; the other sequence stays finite."""
    cache = create_cache(2, 8, block_size=4, head_dim=D)
    cache = append(cache, _rows(rng, 2, 6), jnp.asarray([6, 1], jnp.int32))
    q = jnp.asarray(rng.standard_normal((5, 2, 1, 1, D)), jnp.bfloat16)
    rows = jnp.asarray(rng.standard_normal((5, 2, 1, 1, D)), jnp.bfloat16)

    def step(c, inputs):
        q, row = inputs
        c = append(c, row)
        out, _ = jax_etap.mla_decode(q, c.pages, c.seqlens, c.decode_block_table, head_dim_v=D)
        return c, out

    cache, outs = jax.jit(lambda c: jax.lax.scan(step, c, (q, rows)))(cache)
    outs = to_f32(outs)  # [step, batch, 1, 1, D]; sequence 0 holds 7, 8, then overflows
    assert np.isfinite(outs[:2, 0]).all() and np.isnan(outs[2:, 0]).all()
    assert np.isfinite(outs[:, 1]).all()
    np.testing.assert_array_equal(cache.overflowed, [True, False])


flax = pytest.importorskip("flax.nnx")

from jax_etap.flax import MLAConfig, MultiHeadLatentAttention  # noqa: E402

CONFIG = MLAConfig(hidden_size=32, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=64 - 16,
                   qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8, rope_theta=10000.0)


@pytest.fixture(scope="module")
def layer():
    return MultiHeadLatentAttention(CONFIG, rngs=flax.Rngs(0))


def test_flax_decode_past_capacity_is_nan(rng, layer):
    """A sequence decoded past its cache's capacity gives NaN from that step on; prefilling
    it again (a reset) makes it finite; the other sequence is never affected."""
    graph, state = flax.split(layer)
    prefill = jax.jit(lambda s, x, n, c: flax.merge(graph, s).prefill(x, n, c))
    decode = jax.jit(lambda s, x, c: flax.merge(graph, s).decode(x, c))
    x = lambda s: jnp.asarray(rng.standard_normal((2, s, CONFIG.hidden_size)), jnp.float32)  # noqa: E731
    cache = layer.init_cache(2, 8, block_size=8)  # capacity 8
    _, cache = prefill(state, x(7), jnp.asarray([7, 2], jnp.int32), cache)
    out, cache = decode(state, x(1), cache)  # sequence 0: 8 tokens, full
    assert np.isfinite(np.asarray(out)).all()
    out, cache = decode(state, x(1), cache)  # sequence 0 overflows
    out = np.asarray(out)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    out, cache = decode(state, x(1), cache)
    assert np.isnan(np.asarray(out)[0]).all()
    _, cache = prefill(state, x(7), jnp.asarray([3, 0], jnp.int32), cache)  # refill slot 0
    out, cache = decode(state, x(1), cache)
    assert np.isfinite(np.asarray(out)).all()


def test_flax_prompt_longer_than_the_cache_marks_it(rng, layer):
    cache = layer.init_cache(2, 4, block_size=4)  # capacity 4
    x = jnp.asarray(rng.standard_normal((2, 6, CONFIG.hidden_size)), jnp.float32)
    _, cache = layer.prefill(x, jnp.asarray([6, 4], jnp.int32), cache)
    np.testing.assert_array_equal(cache.overflowed, [True, False])
    out, _ = layer.decode(x[:, :1], cache)
    assert np.isnan(np.asarray(out)[0]).all()
    # The full (not overflowed) sequence cannot take the new token either: now it overflows.
    assert np.isnan(np.asarray(out)[1]).all()
