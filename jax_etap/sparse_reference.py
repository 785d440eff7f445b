"""The pure-jnp sparse (top-k) MLA decode: the executable specification of
`jax_etap.mla_decode_sparse`.

Each query row (a sequence's query position, all its heads) attends to the cache tokens
its indices name, and to nothing else. Only those rows are gathered,
``[batch, s_q, topk, d_qk]``: the reference never lays out the whole cache per query, so
it runs at the shapes DeepSeek-V3.2 decodes at (topk 2048 out of a long context). An FP8
cache (`jax_etap.fp8`) is gathered as bytes and only the gathered tokens are dequantized.
Scores are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_etap._sparse_checks import check_sparse_args
from jax_etap.fp8 import as_decode_cache


def selected_tokens(indices: jax.Array, topk_length: jax.Array | None, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Which index entries select a token, and which query rows name a token that is not there.

    Returns ``valid`` ``[batch, s_q, topk]``: the entry is within the row's first
    ``topk_length`` (clamped to ``[0, topk]``), is not -1 and lies in ``[0, num_tokens)``;
    and ``bad_row`` ``[batch, s_q]``: a used entry other than -1 lies outside that range.
    Entries past ``topk_length`` are never looked at, whatever they hold.
    """
    topk = indices.shape[2]
    used = indices != -1
    if topk_length is not None:
        length = jnp.clip(topk_length, 0, topk)
        used &= jnp.arange(topk)[None, None, :] < length[:, None, None]
    in_range = (indices >= 0) & (indices < num_tokens)
    return used & in_range, jnp.any(used & ~in_range, axis=-1)


def apply_sink(out: jax.Array, lse: jax.Array, attn_sink: jax.Array | None) -> jax.Array:
    """out ``[batch, s_q, h_q, d_v]`` scaled by ``exp(lse) / (exp(lse) + exp(attn_sink))``
    (lse ``[batch, s_q, h_q]``, the sink ``[h_q]``), in float32, back in out's dtype; out
    itself where there is no sink."""
    if attn_sink is None:
        return out
    # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink): 0 for a +inf sink, 1 for a
    # -inf one. A row with no token keeps out 0 (there -inf - -inf would be NaN).
    keep = jnp.where(lse == -jnp.inf, 1.0, jax.nn.sigmoid(lse - attn_sink))
    return (out.astype(jnp.float32) * keep[..., None]).astype(out.dtype)


def mla_decode_sparse_reference(
    q: jax.Array,
    kv_cache: jax.Array,
    indices: jax.Array,
    *,
    topk_length: jax.Array | None = None,
    attn_sink: jax.Array | None = None,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of each query row over the cache tokens it selects, in plain jnp.

    Takes the arguments of `jax_etap.mla_decode_sparse` (without ``implementation``) and
    returns ``(out, lse)``: out ``[batch, s_q, h_q, head_dim_v]`` in q's dtype and lse
    ``[batch, h_q, s_q]`` float32, the natural-log sum of ``exp(softmax_scale * q.k)`` over
    the selected tokens (a token selected twice counts twice; the sink is not in it).
    """
    shape = check_sparse_args(q, kv_cache, indices, topk_length, attn_sink, head_dim_v, softmax_scale)
    valid, bad_row = selected_tokens(indices, topk_length, shape.num_tokens)

    # Skipped entries read token 0 and are then zeroed, so that nothing they would have
    # read (NaN included: 0 * NaN is NaN) reaches the output. An FP8 cache is gathered as
    # bytes and only the gathered tokens are dequantized (to q's dtype: the result is by
    # definition that on fp8.dequantize(kv_cache, q.dtype), and dequantizing is per token).
    tokens = kv_cache.reshape(shape.num_tokens, kv_cache.shape[-1])
    keys = as_decode_cache(tokens[jnp.where(valid, indices, 0)], q.dtype)  # [batch, s_q, topk, d_qk]
    keys = jnp.where(valid[..., None], keys, 0).astype(jnp.float32)
    values = keys[..., : shape.head_dim_v]

    highest = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bshd,bskd->bshk", q.astype(jnp.float32), keys, precision=highest) * shape.softmax_scale
    valid = valid[:, :, None, :]  # [batch, s_q, 1 (heads), topk]
    scores = jnp.where(valid, scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [batch, s_q, h_q]; -inf for a row with no token
    # A +inf score makes every probability of the row inf - inf = NaN; logsumexp alone
    # would report lse = +inf. The row is NaN, lse included, as in mla_decode.
    lse = jnp.where(lse == jnp.inf, jnp.nan, lse)
    probs = jnp.where(valid, jnp.exp(scores - lse[..., None]), 0.0)
    out = jnp.einsum("bshk,bskd->bshd", probs, values, precision=highest)

    out = apply_sink(out, lse, attn_sink)
    out = jnp.where(bad_row[:, :, None, None], jnp.nan, out).astype(q.dtype)
    lse = jnp.where(bad_row[:, :, None], jnp.nan, lse)
    return out, jnp.transpose(lse, (0, 2, 1))
