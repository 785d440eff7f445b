"""mla_decode_sparse on the FP8 cache of `jax_etap.fp8` (uint8, 656 bytes a token): against
the float64 NumPy oracle on the cache as the layout's NumPy oracle (tests/numpy_fp8.py)
dequantizes it, bit for bit against the call on `fp8.dequantize(cache, q.dtype)`, with
junk bytes in every token no row selects, and without ever dequantizing the whole cache.

Broken on purpose, the tests failed: the reference gathering tokens in the wrong flat
order (blocks and offsets swapped) failed every oracle case and the junk test; skipped
entries not zeroed after dequantizing (the gather's token 0 kept) failed the junk test;
dequantizing the whole cache before the gather failed the memory test. Dequantizing to
bfloat16 whatever q's dtype is not seen: for bytes `fp8.quantize` writes from
N(0, 1) rows both dtypes hold every value exactly (docs/fp8.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import assert_same_result, to_f32
from sparse_cases import assert_matches_sparse_oracle, decode_sparse, largest_traced_bytes, make_sparse_case

import jax_etap
from jax_etap import fp8

FP16 = jnp.float16
INF = np.inf

FP8_ORACLE_CASES = [
    pytest.param(dict(batch=2, h_q=1, topk=1), id="h1-topk1"),
    pytest.param(dict(batch=3, h_q=16, s_q=2, topk=64, num_blocks=3, block_size=16, skipped=0.2), id="h16-sq2-repeats"),
    pytest.param(dict(batch=4, h_q=64, s_q=4, topk=100, skipped=0.3, topk_length=(0, 150, 37, -3)), id="h64-sq4-topk_length"),
    pytest.param(dict(h_q=128, topk=2048, num_blocks=64, topk_length=(2048, 1500)), id="h128-topk2048"),
    pytest.param(dict(h_q=8, s_q=2, topk=40, skipped=0.1, attn_sink=(INF, -INF, 0, 1.5, -2, 4, INF, -0.5)), id="h8-sink"),
    pytest.param(dict(h_q=4, s_q=3, topk=33, softmax_scale=0.3, dtype=FP16), id="fp16-scale0.3"),
    pytest.param(dict(h_q=2, topk=0), id="topk0"),
]


@pytest.mark.parametrize("params", FP8_ORACLE_CASES)
def test_fp8_cache_matches_oracle(rng, params):
    case = make_sparse_case(rng, fp8_cache=True, **params)
    assert case.kv_cache.dtype == jnp.uint8 and case.kv_cache.shape[-1] == 656
    assert_matches_sparse_oracle(*decode_sparse(case), case)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, FP16], ids=["bf16", "fp16"])
def test_fp8_cache_is_the_dequantized_cache_bit_for_bit(rng, dtype):
    """The definition: the same call on fp8.dequantize(kv_cache, q.dtype)."""
    case = make_sparse_case(rng, h_q=8, s_q=2, topk=50, skipped=0.2, topk_length=(50, 21), attn_sink=(0.5,) * 8,
                            dtype=dtype, fp8_cache=True)
    dequantized = case.replace(kv_cache=fp8.dequantize(case.kv_cache, dtype))
    assert_same_result(decode_sparse(case), decode_sparse(dequantized), rel=0, lse_tol=0)


def _junk(rng, n: int) -> np.ndarray:
    """n FP8 tokens of junk: NaN codes 0x7F/0xFF, random bytes, NaN / inf / 0 scales."""
    junk = rng.integers(0, 256, (n, 656), dtype=np.uint8)
    junk[: n // 2, :512] = rng.choice(np.array([0x7F, 0xFF], np.uint8), (n // 2, 512))
    scales = rng.choice(np.array([np.nan, np.inf, -np.inf, 0.0, 2.0**100], np.float32), (n, 4))
    junk[:, 512:528] = scales.astype("<f4").view(np.uint8)
    return junk


def test_junk_in_unselected_tokens_never_leaks(rng):
    """Every token no used entry selects (token 0 included, which a gather reads for a
    skipped entry; the tokens named past topk_length too) holds junk that dequantizes to
    NaN: the result is finite, matches the oracle, and equals the clean cache's bit for bit."""
    case = make_sparse_case(rng, batch=3, s_q=2, h_q=8, topk=24, num_blocks=4, block_size=16, skipped=0.3,
                            topk_length=(24, 10, 0), fp8_cache=True)
    indices = np.asarray(case.indices).copy()
    indices[indices == 0] = 7
    used = np.arange(24)[None, None, :] < np.asarray(case.topk_length)[:, None, None]
    selected = np.zeros(case.num_tokens, bool)
    selected[indices[used & (indices >= 0)]] = True
    assert not selected[0] and (~selected).sum() > 8
    clean = case.replace(indices=jnp.asarray(indices))
    tokens = np.asarray(case.kv_cache).reshape(case.num_tokens, 656).copy()
    tokens[~selected] = _junk(rng, int((~selected).sum()))
    junk = clean.replace(kv_cache=jnp.asarray(tokens.reshape(case.kv_cache.shape)))
    assert np.isnan(junk.oracle_cache()).any()
    out, lse = decode_sparse(junk)
    assert np.isfinite(to_f32(out)).all() and np.isfinite(np.asarray(lse)[:2]).all()
    assert_matches_sparse_oracle(out, lse, junk)
    assert_same_result((out, lse), decode_sparse(clean), rel=0, lse_tol=0)


def test_only_the_gathered_tokens_are_dequantized(rng):
    """No value in the traced computation is larger (in bytes) than the FP8 cache: the
    whole cache dequantized (576 values of 2 or 4 bytes a token against 656 bytes) would
    be. The gathered bytes are in it."""
    case = make_sparse_case(rng, batch=2, s_q=3, h_q=4, topk=8, num_blocks=32, block_size=64, fp8_cache=True)
    largest = largest_traced_bytes(lambda *a: jax_etap.mla_decode_sparse(*a), *case.args)
    assert largest <= case.kv_cache.nbytes
    assert largest >= 2 * 3 * 8 * 656


def test_vmap_jit_and_export_on_an_fp8_cache(rng):
    cases = [make_sparse_case(rng, h_q=4, s_q=2, topk=24, num_blocks=4, block_size=16, skipped=0.2, topk_length=(24, 7),
                              fp8_cache=True) for _ in range(3)]
    stack = lambda name: jnp.stack([getattr(c, name) for c in cases])  # noqa: E731

    def f(q, kv_cache, indices, topk_length):
        return jax_etap.mla_decode_sparse(q, kv_cache, indices, topk_length=topk_length)

    args = (stack("q"), stack("kv_cache"), stack("indices"), stack("topk_length"))
    got = jax.jit(jax.vmap(f))(*args)
    for v, c in enumerate(cases):
        assert_same_result((got[0][v], got[1][v]), decode_sparse(c))
    restored = jax.export.deserialize(jax.export.export(jax.jit(jax.vmap(f)))(*args).serialize())
    assert_same_result(restored.call(*args), got, rel=0, lse_tol=0)


FP8_ERRORS = [
    ("width-576", dict(kv_cache=((8, 64, 1, 576), jnp.uint8)), {}, ValueError, r"uint8 kv_cache is an FP8 cache .* last dimension 656, got kv_cache of shape \(8, 64, 1, 576\)"),
    ("width-655", dict(kv_cache=((8, 64, 1, 655), jnp.uint8)), {}, ValueError, r"kv_cache .*656.*\(8, 64, 1, 655\)"),
    ("h_kv-2", dict(kv_cache=((8, 64, 2, 656), jnp.uint8)), {}, ValueError, r"FP8 kv_cache .*\(h_kv = 1\)"),
    ("d_qk-512", dict(q=((2, 1, 4, 512), jnp.bfloat16)), {}, ValueError, r"FP8 kv_cache .* q's last dimension d_qk must be 576"),
    ("head_dim_v-256", {}, dict(head_dim_v=256), ValueError, r"FP8 kv_cache .* head_dim_v must be 512"),
    ("q-float32", dict(q=((2, 1, 4, 576), jnp.float32)), {}, TypeError, r"\bq must be bfloat16 or float16"),
]


@pytest.mark.parametrize("overrides,kwargs,error,match", [c[1:] for c in FP8_ERRORS], ids=[c[0] for c in FP8_ERRORS])
def test_bad_fp8_arguments_raise_at_trace_time(overrides, kwargs, error, match):
    specs = dict(q=((2, 1, 4, 576), jnp.bfloat16), kv_cache=((8, 64, 1, 656), jnp.uint8), indices=((2, 1, 16), jnp.int32))
    specs.update(overrides)
    arrays = {k: jax.ShapeDtypeStruct(*v) for k, v in specs.items()}
    with pytest.raises(error, match=match):
        jax.eval_shape(lambda a: jax_etap.mla_decode_sparse(**a, **kwargs), arrays)


def test_valid_fp8_arguments_trace():
    """The baseline of the error cases traces (each error comes from its one change)."""
    arrays = dict(q=jax.ShapeDtypeStruct((2, 1, 4, 576), jnp.bfloat16), kv_cache=jax.ShapeDtypeStruct((8, 64, 1, 656), jnp.uint8),
                  indices=jax.ShapeDtypeStruct((2, 1, 16), jnp.int32))
    out, lse = jax.eval_shape(lambda a: jax_etap.mla_decode_sparse(**a), arrays)
    assert (out.shape, out.dtype, lse.shape) == ((2, 1, 4, 512), jnp.bfloat16, (2, 4, 1))
