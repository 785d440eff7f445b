"""Bad arguments fail at trace time, naming the argument."""

import jax
import jax.numpy as jnp
import pytest
from cases import make_problem

import jax_etap


def _args(**overrides):
    p = make_problem(0, batch=2, h_q=4, lens=(10, 20))
    args = dict(q=p.q, kv_cache=p.kv_cache, cache_seqlens=p.seqlens, block_table=p.block_table)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,kwargs,error,match",
    [
        (dict(q=jnp.zeros((2, 4, 576), jnp.bfloat16)), {}, ValueError, "q must have rank 4"),
        (dict(kv_cache=jnp.zeros((4, 64, 576), jnp.bfloat16)), {}, ValueError, "kv_cache must have rank 4"),
        (dict(cache_seqlens=jnp.zeros((2, 1), jnp.int32)), {}, ValueError, "cache_seqlens must have rank 1"),
        (dict(block_table=jnp.zeros((2,), jnp.int32)), {}, ValueError, "block_table must have rank 2"),
        (dict(q=jnp.ones((2, 1, 4, 576), jnp.float32)), {}, TypeError, "q must be bfloat16 or float16"),
        (dict(kv_cache=jnp.ones((4, 64, 1, 576), jnp.float16)), {}, TypeError, "kv_cache must have q's dtype"),
        (dict(cache_seqlens=jnp.ones((2,), jnp.int64 if jax.config.x64_enabled else jnp.float32)), {}, TypeError, "cache_seqlens must be int32"),
        (dict(block_table=jnp.ones((2, 1), jnp.uint32)), {}, TypeError, "block_table must be int32"),
        (dict(kv_cache=jnp.ones((4, 64, 1, 512), jnp.bfloat16)), {}, ValueError, "kv_cache's last dimension"),
        (dict(q=jnp.ones((2, 1, 4, 100), jnp.bfloat16)), {}, ValueError, "d_qk must be a multiple of 64"),
        (dict(q=jnp.ones((2, 1, 4, 640), jnp.bfloat16)), {}, ValueError, "d_qk must be a multiple of 64"),
        (dict(kv_cache=jnp.ones((4, 64, 3, 576), jnp.bfloat16)), {}, ValueError, "h_q = 4 must be a multiple of kv_cache's h_kv = 3"),
        (dict(cache_seqlens=jnp.ones((3,), jnp.int32)), {}, ValueError, "cache_seqlens must have shape"),
        (dict(block_table=jnp.ones((3, 1), jnp.int32)), {}, ValueError, "block_table's first dimension"),
        (dict(block_table=None, kv_cache=jnp.ones((3, 64, 1, 576), jnp.bfloat16)), {}, ValueError, "dense kv_cache"),
        ({}, dict(head_dim_v=577), ValueError, "head_dim_v must be in"),
        ({}, dict(head_dim_v=0), ValueError, "head_dim_v must be in"),
        ({}, dict(head_dim_v=512.0), TypeError, "head_dim_v must be a static int"),
        ({}, dict(softmax_scale=0.0), ValueError, "softmax_scale must be a positive"),
        ({}, dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a positive"),
        ({}, dict(softmax_scale=jnp.float32(0.1)), TypeError, "softmax_scale must be a static"),
        ({}, dict(causal="yes"), TypeError, "causal must be a static bool"),
    ],
)
@pytest.mark.parametrize("implementation", [None, "xla"])
def test_bad_input_raises_at_trace_time(overrides, kwargs, error, match, implementation):
    args = _args(**overrides)
    fn = jax.jit(lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, implementation=implementation, **kwargs))
    with pytest.raises(error, match=match):
        fn.trace(args["q"], args["kv_cache"], args["cache_seqlens"], args["block_table"])


def test_unknown_implementation():
    args = _args()
    with pytest.raises(ValueError, match="implementation must be one of"):
        jax_etap.mla_decode(*args.values(), implementation="triton")


@pytest.mark.skipif(jax_etap.kernel_available(), reason="the kernel can run here")
def test_etap_where_it_cannot_run_is_an_error():
    p = make_problem(0, batch=1, lens=(10,))
    fn = jax.jit(lambda *a: jax_etap.mla_decode(*a, implementation="etap"))
    with pytest.raises(ValueError, match="implementation='etap' cannot run"):
        fn(p.q, p.kv_cache, p.seqlens, p.block_table)
