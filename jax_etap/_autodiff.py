"""The gradient of `mla_decode`: the jnp reference's, whatever ran the forward pass.

The kernels compute only the forward pass. Rather than have `jax.grad` fail under one
implementation and differentiate the reference under another, every implementation is
wrapped in one custom VJP whose backward pass is the VJP of
`jax_etap.reference.mla_decode_reference` at the same inputs: the same gradient on every
platform and implementation. It is not fused: the backward recomputes the attention in
jnp (float32 scores, the paged cache gathered densely), so it costs what differentiating
the reference costs. Gradients flow to q and kv_cache; cache_seqlens, block_table and
an FP8 cache's bytes are integers and get none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_etap.reference import mla_decode_reference


def with_reference_gradient(forward: Callable, *, head_dim_v: int, softmax_scale: float | None, causal: bool) -> Callable:
    """``forward(q, kv_cache, cache_seqlens, block_table) -> (out, lse)``, differentiable
    with the reference's gradient."""
    reference = functools.partial(mla_decode_reference, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal)

    @jax.custom_vjp
    def decode(q, kv_cache, cache_seqlens, block_table):
        return forward(q, kv_cache, cache_seqlens, block_table)

    def decode_fwd(q, kv_cache, cache_seqlens, block_table):
        return forward(q, kv_cache, cache_seqlens, block_table), (q, kv_cache, cache_seqlens, block_table)

    def decode_bwd(inputs, cotangents):
        q, kv_cache, cache_seqlens, block_table = inputs
        if not jnp.issubdtype(kv_cache.dtype, jnp.floating):  # an FP8 cache's bytes get no gradient
            _, vjp = jax.vjp(lambda q: reference(q, kv_cache, cache_seqlens, block_table), q)
            return (*vjp(cotangents), None, None, None)
        _, vjp = jax.vjp(lambda q, kv: reference(q, kv, cache_seqlens, block_table), q, kv_cache)
        d_q, d_kv = vjp(cotangents)
        return d_q, d_kv, None, None

    decode.defvjp(decode_fwd, decode_bwd)
    return decode
