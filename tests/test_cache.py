"""`jax_etap.cache`: appends, resets and overflow against a loop-based NumPy model, use
inside jit / scan / while_loop with donation, and decoding from the cache.

The cache's values are random (bfloat16-representable, so writes compare exactly) and
every slot that must not be written holds its own random value, so a write to a wrong
slot, block or sequence shows up as a mismatch of the whole pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_etap
from jax_etap.cache import PagedKVCache, append, check_capacity, create_cache, reset
from jax_etap.testing import mla_decode_numpy, random_paged_cache
from mla_cases import assert_matches, assert_same_result, to_f32

BATCH, BLOCK, MAX_BLOCKS, D = 3, 4, 3, 64  # capacity 12 tokens: appends cross blocks often


def random_cache(rng, *, bad_entries=False) -> PagedKVCache:
    """A pool of random pages (two spare blocks nobody owns) with a shuffled block table;
    with ``bad_entries``, sequence 2's second and third blocks are -1 and num_blocks + 3."""
    key = jax.random.key(int(rng.integers(2**31)))
    pages, _, table = random_paged_cache(key, BATCH, MAX_BLOCKS * BLOCK, block_size=BLOCK, d_qk=D, spare_blocks=2)
    if bad_entries:
        table = table.at[2, 1:].set(jnp.array([-1, pages.shape[0] + 3], jnp.int32))
    return PagedKVCache(pages=pages, block_table=table, seqlens=jnp.zeros((BATCH,), jnp.int32))


class NumpyCache:
    """The spec, one token at a time: token i of sequence b goes to position
    len_b + i if i < num_new[b], position < capacity and its block is in the pool."""

    def __init__(self, cache: PagedKVCache):
        self.pages = to_f32(cache.pages).copy()
        self.table = np.array(cache.block_table)
        self.lengths = np.array(cache.seqlens, np.int64)
        self.capacity = self.table.shape[1] * self.pages.shape[1]

    def append(self, kv, num_new):
        for b in range(len(self.lengths)):
            for i in range(num_new[b]):
                position = self.lengths[b] + i
                if position >= self.capacity:
                    break
                block = self.table[b, position // BLOCK]
                if 0 <= block < len(self.pages):
                    self.pages[block, position % BLOCK] = kv[b, i]
            self.lengths[b] = min(self.lengths[b] + num_new[b], self.capacity)

    def reset(self, mask):
        self.lengths[mask] = 0

    def assert_equals(self, cache: PagedKVCache, what: str):
        np.testing.assert_array_equal(np.asarray(cache.seqlens), self.lengths, err_msg=f"{what}: seqlens")
        np.testing.assert_array_equal(to_f32(cache.pages), self.pages, err_msg=f"{what}: pages")
        np.testing.assert_array_equal(np.asarray(cache.block_table), self.table, err_msg=f"{what}: block_table")


append_jit = jax.jit(append)
reset_jit = jax.jit(reset)


@pytest.mark.parametrize("bad_entries", [False, True], ids=["table-ok", "bad-table-entries"])
def test_random_operations_follow_the_numpy_model(rng, bad_entries):
    """Prompts of different lengths, decode steps of 1 and 3 tokens, resets, and appends
    that overflow, in a random order: the pool, lengths and table always match the model."""
    cache = random_cache(rng, bad_entries=bad_entries)
    model = NumpyCache(cache)
    for op in range(24):
        kind = rng.choice(["prompt", "step1", "step3", "reset"], p=[0.2, 0.4, 0.25, 0.15])
        if kind == "reset":
            mask = rng.random(BATCH) < 0.5
            cache = reset_jit(cache, jnp.asarray(mask))
            model.reset(mask)
        else:
            s_new = {"prompt": 6, "step1": 1, "step3": 3}[kind]
            kv = jnp.asarray(rng.standard_normal((BATCH, s_new, 1, D)), jnp.bfloat16)
            num_new = rng.integers(0, s_new + 1, BATCH) if kind == "prompt" else np.full(BATCH, s_new)
            cache = append_jit(cache, kv, jnp.asarray(num_new, jnp.int32) if kind == "prompt" else None)
            model.append(to_f32(kv), num_new)
        model.assert_equals(cache, f"after op {op} ({kind})")


def test_overflow_drops_tokens_and_saturates(rng):
    cache = random_cache(rng)
    model = NumpyCache(cache)
    kv = jnp.asarray(rng.standard_normal((BATCH, 10, 1, D)), jnp.bfloat16)
    lengths = np.array([10, 3, 0])
    cache = append(cache, kv, jnp.asarray(lengths, jnp.int32))
    model.append(to_f32(kv), lengths)
    kv = jnp.asarray(rng.standard_normal((BATCH, 5, 1, D)), jnp.bfloat16)
    cache = append(cache, kv)  # sequence 0: 10 + 5 > 12
    model.append(to_f32(kv), [5, 5, 5])
    model.assert_equals(cache, "after overflow")
    np.testing.assert_array_equal(cache.seqlens, [12, 8, 5])


def test_create_cache_gives_each_sequence_its_own_contiguous_blocks():
    cache = create_cache(3, 10, block_size=4, head_dim=64)
    np.testing.assert_array_equal(cache.block_table, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    assert cache.pages.shape == (9, 4, 1, 64) and cache.pages.dtype == jnp.bfloat16
    assert cache.capacity == 12 and cache.block_size == 4 and cache.batch == 3
    np.testing.assert_array_equal(cache.seqlens, [0, 0, 0])


def test_scan_and_while_loop_with_donation_equal_eager_appends(rng):
    """Eight decode steps inside lax.scan and lax.while_loop, jit-compiled with the cache
    donated, give the same cache as eight eager appends."""
    steps = 8
    start = append(random_cache(rng), jnp.asarray(rng.standard_normal((BATCH, 5, 1, D)), jnp.bfloat16),
                   jnp.array([5, 2, 0], jnp.int32))
    tokens = jnp.asarray(rng.standard_normal((steps, BATCH, 1, 1, D)), jnp.bfloat16)

    expected = start
    for t in range(steps):
        expected = append(expected, tokens[t])

    @jax.jit
    def scanned(cache, tokens):
        return jax.lax.scan(lambda c, kv: (append(c, kv), None), cache, tokens)[0]

    def loop(cache, tokens):
        body = lambda i, c: append(c, tokens[i])  # noqa: E731
        return jax.lax.fori_loop(0, tokens.shape[0], body, cache)  # a while_loop: bounds are traced

    looped = jax.jit(loop, donate_argnums=0)
    hlo = looped.lower(start, tokens).compile().as_text()
    assert "input_output_alias={ {0}: (0," in hlo, "the donated pages are not aliased to the output"

    for result in (scanned(start, tokens), looped(jax.tree.map(jnp.copy, start), tokens)):
        np.testing.assert_array_equal(result.seqlens, expected.seqlens)
        np.testing.assert_array_equal(to_f32(result.pages), to_f32(expected.pages))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_decoding_from_the_cache_equals_a_dense_cache(rng, dtype):
    """A cache filled by prompts of different lengths and a 2-token step, read by
    mla_decode, against the same tokens laid out densely and the float64 oracle."""
    cache = create_cache(4, 80, block_size=16, head_dim=128, dtype=dtype)
    lengths = np.array([70, 1, 33, 16])
    prompts = rng.standard_normal((4, 70, 1, 128))
    step = rng.standard_normal((4, 2, 1, 128))
    cache = append(cache, jnp.asarray(prompts, dtype), jnp.asarray(lengths, jnp.int32))
    cache = append(cache, jnp.asarray(step, dtype))
    np.testing.assert_array_equal(cache.seqlens, lengths + 2)

    dense = np.zeros((4, cache.capacity, 1, 128))
    for b, n in enumerate(lengths):
        dense[b, : n + 2] = np.concatenate([prompts[b, :n], step[b]])
    dense = to_f32(jnp.asarray(dense, dtype))  # the values the cache holds
    q = jnp.asarray(rng.standard_normal((4, 2, 8, 128)), dtype)
    kwargs = dict(head_dim_v=96, causal=True)
    paged = jax.jit(lambda q, c: jax_etap.mla_decode(q, c.pages, c.seqlens, c.block_table, **kwargs))(q, cache)
    from_dense = jax_etap.mla_decode(q, jnp.asarray(dense, dtype), cache.seqlens, **kwargs)
    assert_same_result(paged, from_dense)
    assert_matches(*paged, *mla_decode_numpy(to_f32(q), dense, lengths + 2, **kwargs), dtype)


def test_check_capacity(rng):
    cache = append(create_cache(3, 8, block_size=4, head_dim=64),
                   jnp.asarray(rng.standard_normal((3, 6, 1, 64)), jnp.bfloat16), jnp.array([6, 2, 0], jnp.int32))
    check_capacity(cache, 2)
    check_capacity(cache, [2, 6, 8])
    with pytest.raises(ValueError, match=r"holds 8 tokens per sequence; sequence 0: 6 \+ 3 tokens would overflow"):
        check_capacity(cache, 3)
    with pytest.raises(ValueError, match=r"sequence 2: 0 \+ 9 tokens"):
        check_capacity(cache, np.array([0, 0, 9]))
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda c: check_capacity(c, 1))(cache)


def test_bad_arguments_name_the_argument():
    cache = create_cache(2, 8, block_size=4, head_dim=64)
    with pytest.raises(ValueError, match="max_seqlen must be a positive int"):
        create_cache(2, 0)
    with pytest.raises(ValueError, match=r"kv must have shape \[batch=2, s_new, h_kv=1, d=64\], got shape \(2, 1, 1, 32\)"):
        append(cache, jnp.zeros((2, 1, 1, 32), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"num_new must be an integer array of shape \[batch=2\]"):
        append(cache, jnp.zeros((2, 1, 1, 64), jnp.bfloat16), jnp.array([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"sequences must be a bool mask of shape \[batch=2\]"):
        reset(cache, jnp.array([0, 1]))
    with pytest.raises(TypeError, match="cache must be a PagedKVCache"):
        append((cache.pages, cache.block_table, cache.seqlens), jnp.zeros((2, 1, 1, 64), jnp.bfloat16))
    with pytest.raises(TypeError, match="cache.seqlens must be int32"):
        append(PagedKVCache(cache.pages, cache.block_table, cache.seqlens.astype(jnp.int16)),
               jnp.zeros((2, 1, 1, 64), jnp.bfloat16))
