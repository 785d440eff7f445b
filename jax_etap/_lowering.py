"""The per-device decode primitive, `mla_decode_shard_p`, and its two lowerings.

`mla_decode_p` (`jax_etap._primitive`) lowers to this primitive on each device's shards.
Its lowering is chosen per platform when XLA compiles, and this is the only place Python
decides anything about the implementation: the jnp reference or the CUDA extension. Which
CUDA kernel runs is the extension's choice (csrc/dispatch.cc), made at run time from the
device and the shapes; the call only says whether the portable kernel was requested.

* ``cpu``: the jnp reference, through `mlir.lower_fun`;
* ``cuda``: the XLA FFI custom call to the extension (for an FP8 cache, after XLA has
  dequantized the blocks this device's block table names: `fp8.referenced_decode_cache`).

No rule is registered for other platforms, and the reference is deliberately not the
platform-less default, so a GPU never runs the reference without being asked to.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from jax_etap import _ffi
from jax_etap._checks import IMPLEMENTATIONS
from jax_etap._shard_plan import result_shardings
from jax_etap.fp8 import referenced_decode_cache
from jax_etap.reference import mla_decode_reference

# Implementations that insist on a CUDA kernel: never a silent fallback to the reference.
KERNEL_IMPLEMENTATIONS = ("cuda", "portable")


def _insists_on_kernel(implementation: str) -> bool:
    """Whether `implementation` (as the caller spelt it, or "auto" for None) names a kernel."""
    return IMPLEMENTATIONS.get(implementation) in KERNEL_IMPLEMENTATIONS


def shape_rule(q, kv_cache, cache_seqlens, block_table, *, head_dim_v, softmax_scale, causal, implementation):
    """The results' types: out [batch, s_q, h_q, head_dim_v] in q's dtype, lse [batch, h_q, s_q]
    float32, laid out (under Explicit mesh axes) as the validated plan of q and the cache says."""
    batch, s_q, h_q, _ = q.shape
    out_sharding, lse_sharding = result_shardings(q, kv_cache)
    out = q.update(shape=(batch, s_q, h_q, head_dim_v), dtype=q.dtype, sharding=out_sharding)
    lse = q.update(shape=(batch, h_q, s_q), dtype=jnp.float32, sharding=lse_sharding)
    return out, lse


def _reference_on_paged(q, kv_cache, cache_seqlens, block_table, *, head_dim_v, softmax_scale, causal):
    out, lse = mla_decode_reference(
        q, kv_cache, cache_seqlens, block_table, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal
    )
    return [out, lse]


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
    if _insists_on_kernel(implementation):
        raise _kernel_unavailable(implementation, "cpu")
    reference = mlir.lower_fun(_reference_on_paged, multiple_results=True)
    return reference(ctx, *args, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal)


def _kernel_call(q, kv_cache, cache_seqlens, block_table, *, head_dim_v, softmax_scale, causal, portable):
    # No kernel reads the FP8 layout yet: they decode its rows dequantized by XLA, on this
    # device's shard, of as few blocks as the pool or the table holds.
    kv_cache, block_table = referenced_decode_cache(kv_cache, block_table, q.dtype)
    batch, s_q, h_q, _ = q.shape
    h_kv = kv_cache.shape[2]
    rows = s_q * (h_q // h_kv)
    # The workspace size must come from shapes alone (csrc/common/limits.h says why).
    slots = batch + _ffi.MAX_SCHEDULE_PARTS
    result_types = (
        jax.ShapeDtypeStruct((batch, s_q, h_q, head_dim_v), q.dtype),  # out
        jax.ShapeDtypeStruct((batch, h_q, s_q), jnp.float32),  # lse
        # Workspace, as XLA-allocated outputs: the normalised output and lse of every
        # piece of a sequence split across CTAs.
        jax.ShapeDtypeStruct((slots, h_kv, rows, head_dim_v), jnp.float32),
        jax.ShapeDtypeStruct((slots, h_kv, rows), jnp.float32),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32),  # which parts hold each sequence
    )
    call = jax.ffi.ffi_call(_ffi.MLA_DECODE_TARGET, result_types)
    out, lse, *_workspace = call(
        q, kv_cache, cache_seqlens, block_table, softmax_scale=np.float32(softmax_scale), causal=causal, portable=portable
    )
    return [out, lse]


def _cuda_lowering(ctx, *args, head_dim_v, softmax_scale, causal, implementation):
    if _ffi.WITH_CUDA:
        kernel = mlir.lower_fun(_kernel_call, multiple_results=True)
        return kernel(
            ctx, *args, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal,
            portable=IMPLEMENTATIONS.get(implementation) == "portable",
        )
    if _insists_on_kernel(implementation):
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
mla_decode_shard_p.def_abstract_eval(shape_rule)
mlir.register_lowering(mla_decode_shard_p, _cpu_lowering, platform="cpu")
mlir.register_lowering(mla_decode_shard_p, _cuda_lowering, platform="cuda")
