"""Bad arguments fail at trace time with ValueError or TypeError naming the argument.

Every case is checked by tracing (``jax.jit(f).trace``: nothing is compiled or run) for
each implementation choice, for the reference function itself, and eagerly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import make_case

import jax_etap

BAD_ARGUMENT = (ValueError, TypeError)


@pytest.fixture
def good(rng):
    """A valid paged problem: batch 2, s_q 1, h_q 4, h_kv 1, d_qk 576, 2 blocks of 64 each."""
    case = make_case(rng, seqlens=(10, 100), h_q=4, block_size=64, spare_blocks=1)
    return dict(q=case.q, kv_cache=case.kv_cache, cache_seqlens=case.cache_seqlens, block_table=case.block_table)


def _random(rng, shape, dtype):
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(rng.integers(0, 4, shape), dtype)
    return jnp.asarray(rng.standard_normal(shape), dtype)


# (id, argument overrides as (shape, dtype) or None, keyword overrides, regex the message must match)
CASES = [
    # wrong ranks
    ("q-rank3", dict(q=((2, 4, 576), jnp.bfloat16)), {}, r"\bq\b"),
    ("q-rank5", dict(q=((2, 1, 1, 4, 576), jnp.bfloat16)), {}, r"\bq\b"),
    ("kv-rank3", dict(kv_cache=((5, 64, 576), jnp.bfloat16)), {}, r"kv_cache"),
    ("kv-rank5", dict(kv_cache=((5, 64, 1, 1, 576), jnp.bfloat16)), {}, r"kv_cache"),
    ("seqlens-rank2", dict(cache_seqlens=((2, 1), jnp.int32)), {}, r"cache_seqlens"),
    ("seqlens-rank0", dict(cache_seqlens=((), jnp.int32)), {}, r"cache_seqlens"),
    ("table-rank1", dict(block_table=((2,), jnp.int32)), {}, r"block_table"),
    ("table-rank3", dict(block_table=((2, 2, 1), jnp.int32)), {}, r"block_table"),
    # d_qk
    ("d_qk-mismatch", dict(kv_cache=((5, 64, 1, 512), jnp.bfloat16)), {}, r"kv_cache|d_qk"),
    ("d_qk-mismatch-q", dict(q=((2, 1, 4, 512), jnp.bfloat16)), {}, r"kv_cache|d_qk|\bq\b"),
    ("d_qk-not-64-multiple", dict(q=((2, 1, 4, 100), jnp.bfloat16), kv_cache=((5, 64, 1, 100), jnp.bfloat16)), {}, r"d_qk|\bq\b"),
    ("d_qk-too-large", dict(q=((2, 1, 4, 640), jnp.bfloat16), kv_cache=((5, 64, 1, 640), jnp.bfloat16)), {}, r"d_qk|\bq\b"),
    # dtypes
    ("q-float32", dict(q=((2, 1, 4, 576), jnp.float32)), {}, r"\bq\b|dtype"),
    ("q-kv-both-float32", dict(q=((2, 1, 4, 576), jnp.float32), kv_cache=((5, 64, 1, 576), jnp.float32)), {}, r"\bq\b"),
    ("q-int", dict(q=((2, 1, 4, 576), jnp.int32), kv_cache=((5, 64, 1, 576), jnp.int32)), {}, r"\bq\b"),
    ("q-fp16-kv-bf16", dict(q=((2, 1, 4, 576), jnp.float16)), {}, r"kv_cache|\bq\b"),
    ("kv-fp16-q-bf16", dict(kv_cache=((5, 64, 1, 576), jnp.float16)), {}, r"kv_cache"),
    ("kv-float32", dict(kv_cache=((5, 64, 1, 576), jnp.float32)), {}, r"kv_cache"),
    ("seqlens-float32", dict(cache_seqlens=((2,), jnp.float32)), {}, r"cache_seqlens"),
    ("seqlens-int16", dict(cache_seqlens=((2,), jnp.int16)), {}, r"cache_seqlens"),
    ("seqlens-uint32", dict(cache_seqlens=((2,), jnp.uint32)), {}, r"cache_seqlens"),
    ("table-uint32", dict(block_table=((2, 2), jnp.uint32)), {}, r"block_table"),
    ("table-int16", dict(block_table=((2, 2), jnp.int16)), {}, r"block_table"),
    ("table-float32", dict(block_table=((2, 2), jnp.float32)), {}, r"block_table"),
    # batch sizes
    ("seqlens-batch", dict(cache_seqlens=((3,), jnp.int32)), {}, r"cache_seqlens"),
    ("table-batch", dict(block_table=((3, 2), jnp.int32)), {}, r"block_table"),
    ("dense-kv-batch", dict(kv_cache=((3, 128, 1, 576), jnp.bfloat16), block_table=None), {}, r"kv_cache"),
    # heads
    ("h_q-not-multiple-of-h_kv", dict(kv_cache=((5, 64, 3, 576), jnp.bfloat16)), {}, r"h_kv|h_q|kv_cache"),
    ("h_kv-larger-than-h_q", dict(kv_cache=((5, 64, 8, 576), jnp.bfloat16)), {}, r"h_kv|h_q|kv_cache"),
    # static arguments
    ("head_dim_v-past-d_qk", {}, dict(head_dim_v=577), r"head_dim_v"),
    ("head_dim_v-0", {}, dict(head_dim_v=0), r"head_dim_v"),
    ("head_dim_v-negative", {}, dict(head_dim_v=-64), r"head_dim_v"),
    ("head_dim_v-float", {}, dict(head_dim_v=512.0), r"head_dim_v"),
    ("softmax_scale-0", {}, dict(softmax_scale=0.0), r"softmax_scale"),
    ("softmax_scale-negative", {}, dict(softmax_scale=-0.1), r"softmax_scale"),
    ("softmax_scale-nan", {}, dict(softmax_scale=float("nan")), r"softmax_scale"),
    ("softmax_scale-inf", {}, dict(softmax_scale=float("inf")), r"softmax_scale"),
]


def _args(good, rng, overrides):
    args = dict(good)
    for name, spec in overrides.items():
        args[name] = None if spec is None else _random(rng, *spec)
    return args


def _trace(implementation, args, kwargs):
    """Traces (no lowering, no compilation) mla_decode on args."""
    fn = jax.jit(lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, implementation=implementation, **kwargs))
    return fn.trace(args["q"], args["kv_cache"], args["cache_seqlens"], args["block_table"])


@pytest.mark.parametrize("implementation", [None, "xla", "etap"], ids=["default", "xla", "etap"])
@pytest.mark.parametrize("overrides,kwargs,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_raises_at_trace_time(good, rng, implementation, overrides, kwargs, match):
    args = _args(good, rng, overrides)
    with pytest.raises(BAD_ARGUMENT, match=match):
        _trace(implementation, args, kwargs)


@pytest.mark.parametrize("overrides,kwargs,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reference_rejects_bad_arguments(good, rng, overrides, kwargs, match):
    args = _args(good, rng, overrides)
    fn = jax.jit(lambda q, kv, s, t: jax_etap.reference.mla_decode_reference(q, kv, s, t, **kwargs))
    with pytest.raises(BAD_ARGUMENT, match=match):
        fn.trace(args["q"], args["kv_cache"], args["cache_seqlens"], args["block_table"])


@pytest.mark.parametrize(
    "overrides,kwargs,match",
    [c[1:] for c in CASES if c[0] in ("q-rank3", "q-float32", "table-uint32", "seqlens-batch", "head_dim_v-past-d_qk", "softmax_scale-0")],
)
def test_bad_argument_raises_eagerly(good, rng, overrides, kwargs, match):
    args = _args(good, rng, overrides)
    with pytest.raises(BAD_ARGUMENT, match=match):
        jax_etap.mla_decode(args["q"], args["kv_cache"], args["cache_seqlens"], args["block_table"], **kwargs)


@pytest.mark.parametrize("implementation", ["triton", "ETAP", "", "cudnn", 1, "auto"])
def test_unknown_implementation(good, implementation):
    with pytest.raises(BAD_ARGUMENT, match="implementation"):
        jax_etap.mla_decode(*good.values(), implementation=implementation)
    fn = jax.jit(lambda *a: jax_etap.mla_decode(*a, implementation=implementation))
    with pytest.raises(BAD_ARGUMENT, match="implementation"):
        fn.trace(*good.values())


def test_valid_arguments_trace(good):
    """The baseline of the cases above is valid (so each error comes from its one change)."""
    for implementation in (None, "xla", "etap"):
        fn = jax.jit(lambda *a: jax_etap.mla_decode(*a, implementation=implementation))
        fn.trace(*good.values())
    jax.jit(jax_etap.reference.mla_decode_reference).trace(*good.values())


def test_valid_edge_arguments_trace(rng):
    """Limits that must be accepted: d_qk 64 and 576, head_dim_v == d_qk, fp16, h_kv == h_q."""
    for d, dv, h_q, h_kv, dtype in [(64, 64, 2, 2, jnp.float16), (576, 576, 16, 1, jnp.bfloat16), (576, 1, 1, 1, jnp.bfloat16)]:
        case = make_case(rng, seqlens=(3,), d_qk=d, head_dim_v=dv, h_q=h_q, h_kv=h_kv, dtype=dtype)
        out = jax.eval_shape(lambda *a: jax_etap.mla_decode(*a, head_dim_v=dv), *case.args)
        assert out[0].shape == (1, 1, h_q, dv) and out[0].dtype == dtype
        assert out[1].shape == (1, h_q, 1) and out[1].dtype == jnp.float32


@pytest.mark.skipif(jax_etap.kernel_available(), reason="the kernel can run here")
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("implementation", ["etap", "portable"])
def test_kernel_where_it_cannot_run_raises(rng, paged, implementation):
    """implementation="etap"/"portable" must never silently fall back to the reference.

    It may raise at trace time or when the jitted function is lowered/compiled (first
    call); the message must name the implementation.
    """
    case = make_case(rng, seqlens=(10, 20), h_q=4, block_size=64 if paged else None)
    fn = jax.jit(lambda *a: jax_etap.mla_decode(*a, implementation=implementation))
    with pytest.raises(Exception, match=implementation) as info:
        out = fn(*case.args)
        jax.block_until_ready(out)
    assert not isinstance(info.value, AssertionError)
    # Eagerly too.
    with pytest.raises(Exception, match=implementation):
        jax.block_until_ready(jax_etap.mla_decode(*case.args, implementation=implementation))
    # And lowering for the CPU explicitly.
    with pytest.raises(Exception, match=implementation):
        fn.trace(*case.args).lower(lowering_platforms=("cpu",))


def test_static_arguments_must_be_static(good):
    """Traced values for static arguments are an error naming the argument (not a crash)."""
    fn = jax.jit(lambda q, kv, s, t, scale: jax_etap.mla_decode(q, kv, s, t, softmax_scale=scale))
    with pytest.raises(BAD_ARGUMENT, match="softmax_scale"):
        fn.trace(*good.values(), np.float32(0.1))
    fn = jax.jit(lambda q, kv, s, t, causal: jax_etap.mla_decode(q, kv, s, t, causal=causal))
    with pytest.raises(BAD_ARGUMENT, match="causal"):
        fn.trace(*good.values(), True)
