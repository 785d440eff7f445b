"""The pure-jnp MLA decode: the executable specification of `jax_etap.mla_decode`.

It is what `mla_decode` runs on CPU (and with ``implementation="xla"`` anywhere), and
what the CUDA kernel is tested against. It favours being obviously right over speed:
the paged cache is gathered into a dense one and scores are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_etap._checks import check_decode_args
from jax_etap.fp8 import as_decode_cache


def gather_paged_cache(kv_cache: jax.Array, block_table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lays a paged cache out densely: ``[batch, max_blocks * block_size, h_kv, d]``.

    Returns the dense cache and, per block-table entry, whether the entry lies outside
    ``[0, num_blocks)``. Such entries are never dereferenced: their tokens read as NaN.
    """
    num_blocks, block_size, h_kv, d = kv_cache.shape
    batch, max_blocks = block_table.shape
    blocks = kv_cache.at[block_table].get(mode="fill", fill_value=jnp.nan)
    out_of_range = (block_table < 0) | (block_table >= num_blocks)
    return blocks.reshape(batch, max_blocks * block_size, h_kv, d), out_of_range


def visible_keys(seqlens: jax.Array, s_q: int, capacity: int, causal: bool) -> jax.Array:
    """``[batch, s_q, capacity]`` mask: which keys each query position attends to.

    The s_q queries are the last s_q tokens of each sequence, so with ``causal`` query i
    sees keys ``0 .. seqlen - s_q + i``; otherwise every query sees ``0 .. seqlen - 1``.
    """
    key = jnp.arange(capacity)[None, None, :]
    end = seqlens[:, None, None]
    if causal:
        end = end - s_q + 1 + jnp.arange(s_q)[None, :, None]
    return key < end


def mla_decode_reference(
    q: jax.Array,
    kv_cache: jax.Array,
    cache_seqlens: jax.Array,
    block_table: jax.Array | None = None,
    *,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention of each query head over its sequence's cached keys, in plain jnp.

    Takes the arguments of `jax_etap.mla_decode` (without ``implementation``) and returns
    ``(out, lse)``: out ``[batch, s_q, h_q, head_dim_v]`` in q's dtype and lse
    ``[batch, h_q, s_q]`` float32, the natural-log sum of ``exp(softmax_scale * q.k)``.
    """
    shape = check_decode_args(q, kv_cache, cache_seqlens, block_table, head_dim_v, softmax_scale, causal)
    kv_cache = as_decode_cache(kv_cache, q.dtype)  # an FP8 cache is defined by its dequantized rows
    batch, s_q, h_q, d_qk = q.shape
    groups = h_q // shape.h_kv

    if block_table is None:
        keys, capacity = kv_cache, kv_cache.shape[1]
        sequence_has_bad_block = jnp.zeros((batch,), bool)
    else:
        keys, out_of_range = gather_paged_cache(kv_cache, block_table)
        capacity = keys.shape[1]
        block_size = kv_cache.shape[1]
    seqlens = jnp.clip(cache_seqlens, 0, capacity)
    if block_table is not None:
        # Only the blocks that hold the sequence's tokens are looked up.
        used = jnp.arange(block_table.shape[1])[None, :] < -(-seqlens[:, None] // block_size)
        sequence_has_bad_block = jnp.any(out_of_range & used, axis=1)

    # What lies past a sequence's end, NaN included, must not reach the output: zero it
    # (a masked score gives p = 0, but 0 * NaN would still be NaN).
    in_sequence = jnp.arange(capacity)[None, :] < seqlens[:, None]
    keys = jnp.where(in_sequence[:, :, None, None], keys, 0).astype(jnp.float32)
    values = keys[..., :head_dim_v]

    # Query head h reads KV head h // groups.
    q32 = q.astype(jnp.float32).reshape(batch, s_q, shape.h_kv, groups, d_qk)
    highest = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bshgd,bkhd->bhgsk", q32, keys, precision=highest) * shape.softmax_scale
    visible = visible_keys(seqlens, s_q, capacity, causal)[:, None, None, :, :]
    scores = jnp.where(visible, scores, -jnp.inf)

    lse = jax.nn.logsumexp(scores, axis=-1)  # -inf for a row that sees no key
    # A +inf score (an infinite value in q or in a visible key) makes every probability
    # of the row exp(inf - inf) = NaN; logsumexp alone would report lse = +inf for it.
    # Such a row is NaN, lse included, as exact IEEE arithmetic (and the kernel) gives.
    lse = jnp.where(lse == jnp.inf, jnp.nan, lse)
    probs = jnp.where(visible, jnp.exp(scores - lse[..., None]), 0.0)
    out = jnp.einsum("bhgsk,bkhd->bshgd", probs, values, precision=highest)

    out = out.reshape(batch, s_q, h_q, head_dim_v)
    lse = lse.reshape(batch, h_q, s_q)
    bad = sequence_has_bad_block
    out = jnp.where(bad[:, None, None, None], jnp.nan, out).astype(q.dtype)
    lse = jnp.where(bad[:, None, None], jnp.nan, lse)
    return out, lse
