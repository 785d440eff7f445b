"""`mla_decode_sparse`: MLA decode over the top-k cache tokens each query selects
(DeepSeek Sparse Attention, as in DeepSeek-V3.2). See docs/sparse.md."""

from __future__ import annotations

import warnings

import jax

from jax_etap._shard_plan import layout_in_types, result_shardings
from jax_etap._sparse_checks import check_sparse_args, check_sparse_implementation
from jax_etap._sparse_gathered import gathered_decode
from jax_etap.sparse_reference import mla_decode_sparse_reference


def mla_decode_sparse(
    q: jax.Array,
    kv_cache: jax.Array,
    indices: jax.Array,
    *,
    topk_length: jax.Array | None = None,
    attn_sink: jax.Array | None = None,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Multi-head latent attention for decoding over the cache tokens each query selects.

    Query row (b, i) attends, with all its heads, to the tokens named by the first
    ``topk_length[b]`` entries of ``indices[b, i]``, and to no other: there is no causal
    mask, the indexer that chose the tokens decides. K = the d_qk channels of a token's
    cache row, V = its first ``head_dim_v`` channels (absorbed MLA, one KV head).

    Args:
      q: ``[batch, s_q, h_q, d_qk]``, bfloat16 or float16; d_qk a multiple of 64, at most
        576 (DeepSeek: 576, the 512 latent + 64 rope channels).
      kv_cache: ``[num_blocks, block_size, 1, d_qk]`` of q's dtype, or the FP8 cache of
        `jax_etap.fp8`, ``uint8 [num_blocks, block_size, 1, 656]`` (then d_qk is 576 and
        head_dim_v 512): the result is, by definition, the one on
        ``fp8.dequantize(kv_cache, q.dtype)``, but only the selected tokens are
        dequantized. A uint8 cache of another width is a ValueError.
      indices: ``[batch, s_q, topk]`` int32, flat token positions
        ``block * block_size + offset`` into the cache seen as
        ``[num_blocks * block_size, d_qk]`` (no block table). -1 selects nothing. A token
        named twice counts twice. Any other value outside ``[0, num_blocks * block_size)``
        is never read and makes every out and lse value of that query row (all heads) NaN,
        as a bad block-table entry does for a sequence in `mla_decode`.
      topk_length: ``[batch]`` int32 or None. Only the first ``topk_length[b]`` entries of
        sequence b's index rows are used, the count clamped to ``[0, topk]``; later entries
        are never looked at (an out-of-range one there gives no NaN). None uses all topk.
      attn_sink: ``[h_q]`` float32 or None: a per-head logit that takes part in the softmax
        but has no value. out is scaled by ``exp(lse) / (exp(lse) + exp(attn_sink))``; lse
        is not changed. +inf gives out 0, -inf leaves out as without a sink.
      head_dim_v: channels of V, at most d_qk.
      softmax_scale: the scale of q.k; None means ``d_qk ** -0.5``.
      implementation: ``"xla"`` runs the jnp reference
        (`jax_etap.sparse_reference.mla_decode_sparse_reference`). ``"cuda"`` (or its
        older name ``"etap"``) runs the CUDA decode kernels of `jax_etap.mla_decode` on
        the selected rows, which XLA first gathers into a paged cache of their own
        (`jax_etap._sparse_gathered`: about three times the bytes of a kernel that gathers
        for itself, until one exists), and raises where the kernels cannot run;
        ``"portable"`` does the same on the portable kernel. None runs the CUDA path when
        jax's default backend is a GPU, else the jnp reference. Under Explicit mesh axes
        the CUDA path does not run yet: None runs the reference with a RuntimeWarning, a
        kernel request raises NotImplementedError.

    Returns:
      ``(out, lse)``: out ``[batch, s_q, h_q, head_dim_v]`` in q's dtype; lse
      ``[batch, h_q, s_q]`` float32, the natural-log sum of ``exp(softmax_scale * q.k)``
      over the selected tokens. A row that selects no token has out 0 and lse -inf.

    Raises:
      TypeError, ValueError: at trace time, for arguments of the wrong rank, shape, dtype
        or value, naming the argument, and as `jax_etap.mla_decode` does where the CUDA
        kernels are asked for and cannot run.
    """
    check_sparse_implementation(implementation)
    shape = check_sparse_args(q, kv_cache, indices, topk_length, attn_sink, head_dim_v, softmax_scale)
    on_kernels = implementation not in (None, "xla") or (implementation is None and jax.default_backend() == "gpu")
    explicit_axes = layout_in_types(jax.typeof(q))
    if on_kernels and explicit_axes:
        # The CUDA path calls mla_decode inside the computation that auto_axes hands to XLA,
        # which newer jax (0.12.1) fails to compile ("No registered implementation for
        # untyped custom call to Sharding"). Not silently: None warns, a kernel request raises.
        if implementation is not None:
            raise NotImplementedError(
                f"implementation={implementation!r}: mla_decode_sparse's CUDA path does not run under Explicit "
                "mesh axes yet; use Auto axes, or implementation=None or 'xla' for the jnp reference."
            )
        warnings.warn(
            "mla_decode_sparse runs the jnp reference under Explicit mesh axes: its CUDA path does not run there yet.",
            RuntimeWarning,
            stacklevel=2,
        )
        on_kernels = False

    def decode(q, kv_cache, indices, topk_length, attn_sink):
        if on_kernels:
            return gathered_decode(q, kv_cache, indices, topk_length, attn_sink, shape, implementation)
        return mla_decode_sparse_reference(
            q, kv_cache, indices, topk_length=topk_length, attn_sink=attn_sink,
            head_dim_v=head_dim_v, softmax_scale=softmax_scale,
        )

    if explicit_axes:
        # Under Explicit mesh axes jnp's gather must be told its layout; let XLA partition
        # the computation as under Auto axes instead, the results laid out like q. (Every
        # array goes positionally: auto_axes converts only positional arguments.)
        decode = jax.sharding.auto_axes(decode, out_sharding=result_shardings(jax.typeof(q)))
    return decode(q, kv_cache, indices, topk_length, attn_sink)
