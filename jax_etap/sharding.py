"""`mla_decode` on a mesh of devices, as a `jax.shard_map` the caller lays out.

`jax_etap.mla_decode` needs nothing from this module to run sharded: called under
`jax.jit` on arguments laid out on a mesh, it computes each shard on its own device
through custom partitioning (docs/sharding.md lists the layouts). `shard_map_decode` is
the same computation as an explicit `jax.shard_map`, for programs that want the layout
in the code: it exports with `jax.export` (custom partitioning does not serialize) and
keeps the persistent compilation cache usable (custom partitioning defeats it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jax_etap import api
from jax_etap._shard_plan import DecodeResult, plan_layout


def _axes(name: str, axes: str | Sequence[str]) -> tuple[str, ...]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if not all(isinstance(a, str) for a in axes):
        raise TypeError(f"{name} must be a mesh axis name or a sequence of them, got {axes!r}")
    return axes


def shard_map_decode(
    mesh: jax.sharding.Mesh,
    *,
    batch_axes: str | Sequence[str] = (),
    head_axes: str | Sequence[str] = (),
    shard_pool: bool = False,
    **decode_kwargs,
) -> Callable[..., DecodeResult]:
    """`jax_etap.mla_decode` as a `jax.shard_map` over ``mesh``.

    The returned function takes ``(q, kv_cache, cache_seqlens, block_table=None)`` with
    global shapes, like `mla_decode`, and gives the same ``(out, lse)``, computed on each
    device from its shards with no communication. It lays its inputs out as:

    * q ``P(batch_axes, None, head_axes, None)``; cache_seqlens ``P(batch_axes)``;
      block_table ``P(batch_axes, None)``;
    * kv_cache ``P(batch_axes if shard_pool else None, None, head_axes if h_kv > 1 else None, None)``:
      replicated along the head axes for MLA (h_kv = 1). With ``shard_pool`` each batch
      shard holds the blocks of its own sequences (for a dense cache, its rows) and block
      tables keep global indices: a sequence that uses a block held by another batch
      shard gets NaN outputs, like one that uses an out-of-range block.

    and its outputs as out ``P(batch_axes, None, head_axes, None)``, lse
    ``P(batch_axes, head_axes, None)``. Inputs laid out otherwise are resharded by
    shard_map with Auto mesh axes, and refused by it with Explicit ones.

    Args:
      mesh: the device mesh.
      batch_axes: mesh axis or axes to split the batch over.
      head_axes: mesh axis or axes to split the query heads over.
      shard_pool: split the cache's first dimension over ``batch_axes`` instead of
        replicating it.
      **decode_kwargs: `mla_decode`'s keyword arguments (head_dim_v, softmax_scale,
        causal, implementation).

    Raises:
      ValueError: when called, for a layout that would need data from other devices
        (heads split across KV-head groups, a batch the axes do not divide, ...).
    """
    batch, heads = _axes("batch_axes", batch_axes), _axes("head_axes", head_axes)
    decode = functools.partial(api.mla_decode, **decode_kwargs)

    def call(q, kv_cache, cache_seqlens, block_table=None) -> DecodeResult:
        kv_heads = heads if kv_cache.shape[2] > 1 else ()
        plan = plan_layout(
            dict(mesh.shape),
            q.shape,
            PartitionSpec(batch, None, heads, None),
            kv_cache.shape,
            PartitionSpec(batch if shard_pool else (), None, kv_heads, None),
            dense=block_table is None,
        )
        if block_table is None:
            # As in mla_decode: a dense cache is a pool of one block per sequence, which a
            # replicated cache needs (each batch shard reads its own rows of it).
            table = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
            block_table = jax.device_put(table, NamedSharding(mesh, plan.in_specs()[3]))
        return plan.shard_map(decode, mesh)(q, kv_cache, cache_seqlens, block_table)

    return call
