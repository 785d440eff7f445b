"""`mla_decode`, the public entry point, and which implementation runs it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_etap import _ffi
from jax_etap._autodiff import with_reference_gradient
from jax_etap._checks import check_decode_args, check_implementation
from jax_etap._primitive import mla_decode_p
from jax_etap._shard_plan import layout_in_types, result_shardings
from jax_etap.reference import mla_decode_reference


def kernel_available() -> bool:
    """Whether ``implementation=None`` runs the CUDA kernel on jax's default device.

    True when the extension was built with CUDA and jax's default backend is a CUDA GPU;
    otherwise `mla_decode` runs the jnp reference (and ``implementation="cuda"`` raises).
    """
    return _ffi.WITH_CUDA and jax.default_backend() == "gpu" and jax.devices()[0].platform == "gpu"


def mla_decode(
    q: jax.Array,
    kv_cache: jax.Array,
    cache_seqlens: jax.Array,
    block_table: jax.Array | None = None,
    *,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = False,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Multi-head latent attention for decoding, over a paged or dense KV cache.

    Every query head attends over its sequence's cached keys; the values are the first
    ``head_dim_v`` channels of the same cache rows (absorbed MLA: K = the 512 latent +
    64 rope channels, V = the latent). Query head h uses KV head ``h // (h_q // h_kv)``.

    Under `jax.jit` with the arguments laid out on a device mesh (q's batch and heads
    split, the cache replicated or split like them), each device computes its own shards
    with no communication, and a layout that would need any raises; ``"xla"`` is instead
    partitioned by XLA like any jnp code. See docs/sharding.md.

    Args:
      q: ``[batch, s_q, h_q, d_qk]``, bfloat16 or float16; d_qk a multiple of 64, at most 576.
      kv_cache: paged ``[num_blocks, block_size, h_kv, d_qk]`` (token t of sequence b lives
        at ``kv_cache[block_table[b, t // block_size], t % block_size]``), or dense
        ``[batch, s_k, h_kv, d_qk]`` when ``block_table`` is None. Same dtype as q; or an
        FP8 cache: uint8 ``[num_blocks, block_size, 1, 656]`` (dense ``[batch, s_k, 1, 656]``)
        of `jax_etap.fp8` tokens, for d_qk 576 and head_dim_v 512, whose result is the
        result on ``jax_etap.fp8.dequantize(kv_cache, q.dtype)``. No CUDA kernel reads FP8
        yet: on a GPU XLA dequantizes, on each call and each device's shard, the blocks
        the block table names or the whole pool, whichever is fewer
        (`jax_etap.fp8.referenced_decode_cache`), and the bf16/fp16 kernel runs on that:
        it saves the cache's memory between calls, not within them.
      cache_seqlens: ``[batch]`` int32, the valid tokens of each sequence. Values are
        clamped to ``[0, capacity]`` (capacity: s_k, or max_blocks_per_seq * block_size).
      block_table: ``[batch, max_blocks_per_seq]`` int32, or None for a dense cache. If a
        block holding a sequence's tokens has an index outside ``[0, num_blocks)``, it is
        never read and all of that sequence's outputs are NaN. Entries past the blocks a
        sequence uses are ignored.
      head_dim_v: channels of V, at most d_qk.
      softmax_scale: the scale of q.k; None means ``d_qk ** -0.5``.
      causal: the s_q queries are the last s_q tokens of the sequence (multi-token
        prediction): query i sees keys ``0 .. seqlen - s_q + i``. Otherwise every query
        sees keys ``0 .. seqlen - 1``.
      implementation: None picks the CUDA kernels where the call is compiled for a CUDA
        GPU and the extension has CUDA (`kernel_available`), else the jnp reference;
        ``"cuda"`` insists on the CUDA kernels and raises where they cannot run. Which
        kernel runs is the extension's choice (csrc/dispatch.cc): on Hopper the ETAP
        kernel (wgmma, TMA; up to 32 query rows per KV head, the wide kernel above) for
        d_qk 512/576, head_dim_v 512 and block sizes that tile 64 keys, else the portable
        kernel. ``"etap"`` is an alias of ``"cuda"`` (its earlier name), kept for
        existing callers. ``"portable"`` insists on the portable kernel (sm_80+, any
        shape), also on Hopper, e.g. to compare the two; ``"xla"`` always runs the jnp
        reference (`jax_etap.reference.mla_decode_reference`), as in
        `jax.nn.dot_product_attention`.

    Returns:
      ``(out, lse)``: out ``[batch, s_q, h_q, head_dim_v]`` in q's dtype; lse
      ``[batch, h_q, s_q]`` float32, the natural-log sum of ``exp(softmax_scale * q.k)``
      over the keys the row sees. A row that sees no key has out 0 and lse -inf.

    Differentiable in q and kv_cache under every implementation, with the same gradient:
    the jnp reference's (a custom VJP whose backward pass recomputes the attention in jnp;
    it is not fused, see `jax_etap._autodiff`).

    Raises:
      TypeError, ValueError: at trace time, for arguments of the wrong rank, shape,
        dtype or value, naming the argument; ValueError also for a refused layout on a
        mesh with Explicit axes (with Auto axes, compilation fails with its message).
    """
    requested = check_implementation(implementation)
    shape = check_decode_args(q, kv_cache, cache_seqlens, block_table, head_dim_v, softmax_scale, causal)
    if requested == "xla":
        reference = functools.partial(mla_decode_reference, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal)
        if layout_in_types(jax.typeof(q)):
            # Under Explicit mesh axes jnp ops such as the reference's gather must be told
            # their layouts; let XLA partition the reference as under Auto axes instead.
            reference = jax.sharding.auto_axes(reference, out_sharding=result_shardings(jax.typeof(q)))
        return reference(q, kv_cache, cache_seqlens, block_table)
    if block_table is None:
        # A dense cache is a paged one with a single block per sequence.
        block_table = jnp.arange(shape.batch, dtype=jnp.int32)[:, None]
    bind = functools.partial(
        mla_decode_p.bind,
        head_dim_v=shape.head_dim_v,
        softmax_scale=shape.softmax_scale,
        causal=bool(causal),
        implementation=implementation or "auto",  # as spelt, so that an error names the caller's word
    )
    # The kernels have no backward pass: the gradient is the reference's (jax_etap._autodiff).
    decode = with_reference_gradient(
        lambda *args: tuple(bind(*args)), head_dim_v=shape.head_dim_v, softmax_scale=shape.softmax_scale, causal=causal
    )
    return decode(q, kv_cache, cache_seqlens, block_table)
