"""The `mla_decode` primitive: shape rule, per-platform lowerings and batching rule.

The primitive always sees the paged layout (a dense cache is passed as one block per
sequence). `mla_decode_p` is what `mla_decode` binds (it has the batching rule); on a mesh
it lowers (`jax_etap._partitioning`: custom partitioning, or a shard_map under Explicit
axes) to `mla_decode_shard_p` on each device's shards. The lowering of
`mla_decode_shard_p` is chosen per platform when XLA compiles, which is where the
implementation is decided:

* ``cuda``: the XLA FFI custom call to the CUDA kernel;
* ``cpu``: the jnp reference, through `mlir.lower_fun`.

No rule is registered for other platforms, and the reference is deliberately not the
platform-less default, so a GPU never runs the reference without being asked to.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir, xla

from jax_etap import _extension
from jax_etap._shard_plan import result_shardings
from jax_etap.reference import mla_decode_reference

mla_decode_p = Primitive("jax_etap_mla_decode")
mla_decode_p.multiple_results = True
mla_decode_p.def_impl(lambda *args, **params: xla.apply_primitive(mla_decode_p, *args, **params))

# The kernels cut the keys of the batch into at most this many parts (one persistent CTA
# per SM and per group of query rows; csrc/schedule.cuh), a sequence cut into several
# pieces writes each to its own slot of the workspace, and there are at most
# batch + parts such pieces. 132 is the H100's and H200's SM count; a GPU with more SMs
# runs with this many parts. The workspace size must come from shapes alone: the launch
# may not depend on runtime values (cache_seqlens) if XLA is to capture it in a graph.
MAX_SCHEDULE_PARTS = 132


def _abstract_eval(q, kv_cache, cache_seqlens, block_table, *, head_dim_v, softmax_scale, causal, implementation):
    batch, s_q, h_q, _ = q.shape
    out_sharding, lse_sharding = result_shardings(q, kv_cache)  # the layouts, under Explicit mesh axes
    out = q.update(shape=(batch, s_q, h_q, head_dim_v), dtype=q.dtype, sharding=out_sharding)
    lse = q.update(shape=(batch, h_q, s_q), dtype=jnp.float32, sharding=lse_sharding)
    return out, lse


mla_decode_p.def_abstract_eval(_abstract_eval)


def _reference_on_paged(q, kv_cache, cache_seqlens, block_table, *, head_dim_v, softmax_scale, causal):
    out, lse = mla_decode_reference(
        q, kv_cache, cache_seqlens, block_table, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal
    )
    return [out, lse]


# Implementations that insist on a CUDA kernel: never a silent fallback to the reference.
_KERNEL_IMPLEMENTATIONS = ("etap", "portable")


def _kernel_unavailable(implementation: str, platform: str) -> ValueError:
    reason = (
        "the extension was built without CUDA (no nvcc at install time)"
        if platform == "cuda"
        else f"the computation is placed on {platform!r}, and the kernel runs only on CUDA GPUs"
    )
    return ValueError(
        f"implementation={implementation!r} cannot run: {reason}. Use implementation=None or 'xla' for the jnp reference."
    )


def _cpu_lowering(ctx, *args, head_dim_v, softmax_scale, causal, implementation):
    if implementation in _KERNEL_IMPLEMENTATIONS:
        raise _kernel_unavailable(implementation, "cpu")
    reference = mlir.lower_fun(_reference_on_paged, multiple_results=True)
    return reference(ctx, *args, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal)


def _kernel_call(q, kv_cache, cache_seqlens, block_table, *, head_dim_v, softmax_scale, causal, portable):
    batch, s_q, h_q, _ = q.shape
    h_kv = kv_cache.shape[2]
    rows = s_q * (h_q // h_kv)
    slots = batch + MAX_SCHEDULE_PARTS
    result_types = (
        jax.ShapeDtypeStruct((batch, s_q, h_q, head_dim_v), q.dtype),  # out
        jax.ShapeDtypeStruct((batch, h_q, s_q), jnp.float32),  # lse
        # Workspace, as XLA-allocated outputs: the normalised output and lse of every
        # piece of a sequence split across CTAs.
        jax.ShapeDtypeStruct((slots, h_kv, rows, head_dim_v), jnp.float32),
        jax.ShapeDtypeStruct((slots, h_kv, rows), jnp.float32),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32),  # which parts hold each sequence
    )
    call = jax.ffi.ffi_call(_extension.MLA_DECODE_TARGET, result_types)
    out, lse, *_workspace = call(
        q, kv_cache, cache_seqlens, block_table, softmax_scale=np.float32(softmax_scale), causal=causal, portable=portable
    )
    return [out, lse]


def _cuda_lowering(ctx, *args, head_dim_v, softmax_scale, causal, implementation):
    if _extension.WITH_CUDA:
        kernel = mlir.lower_fun(_kernel_call, multiple_results=True)
        return kernel(
            ctx, *args, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal,
            portable=implementation == "portable",
        )
    if implementation in _KERNEL_IMPLEMENTATIONS:
        raise _kernel_unavailable(implementation, "cuda")
    warnings.warn(
        "jax_etap was built without CUDA: mla_decode runs the jnp reference on the GPU. "
        "Reinstall with nvcc on PATH for the kernel (see jax_etap.build_info()).",
        RuntimeWarning,
        stacklevel=2,
    )
    return _cpu_lowering(ctx, *args, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal, implementation=None)


# What one device computes once a call is partitioned: it has the platform lowerings and
# is bound only while mla_decode_p is lowered, so it needs no impl or batching rule.
mla_decode_shard_p = Primitive("jax_etap_mla_decode_shard")
mla_decode_shard_p.multiple_results = True
mla_decode_shard_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(mla_decode_shard_p, _cpu_lowering, platform="cpu")
mlir.register_lowering(mla_decode_shard_p, _cuda_lowering, platform="cuda")


def _move_to_front(x, dim, size):
    """The batched axis of ``x`` moved to the front, or ``x`` broadcast along a new one."""
    if dim is None:
        return jnp.broadcast_to(x, (size, *x.shape))
    return jnp.moveaxis(x, dim, 0)


def _batch_rule(args, dims, **params):
    """vmap folds the mapped axis into the batch: V decode calls become one call of V*batch."""
    q, kv_cache, cache_seqlens, block_table = args
    q_dim, kv_dim, seqlens_dim, table_dim = dims
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)

    q, cache_seqlens, block_table = (
        _move_to_front(x, d, size) for x, d in ((q, q_dim), (cache_seqlens, seqlens_dim), (block_table, table_dim))
    )
    if kv_dim is not None:
        # One pool per mapped call: concatenate the pools and point each call's table at
        # its own part. Out-of-range entries stay out of range (-1), so they stay NaN.
        kv_cache = jnp.moveaxis(kv_cache, kv_dim, 0)
        num_blocks = kv_cache.shape[1]
        kv_cache = kv_cache.reshape(size * num_blocks, *kv_cache.shape[2:])
        offsets = (jnp.arange(size, dtype=jnp.int32) * num_blocks)[:, None, None]
        in_range = (block_table >= 0) & (block_table < num_blocks)
        block_table = jnp.where(in_range, block_table + offsets, -1)

    batch = q.shape[1]
    out, lse = mla_decode_p.bind(
        q.reshape(size * batch, *q.shape[2:]),
        kv_cache,
        cache_seqlens.reshape(size * batch),
        block_table.reshape(size * batch, block_table.shape[2]),
        **params,
    )
    return [out.reshape(size, batch, *out.shape[1:]), lse.reshape(size, batch, *lse.shape[1:])], [0, 0]


batching.primitive_batchers[mla_decode_p] = _batch_rule
