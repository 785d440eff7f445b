"""The `mla_decode` primitive, `mla_decode_p`: its shape rule, batching rule and lowering
on a mesh, in one place. `mla_decode` (`jax_etap.api`) binds it.

The primitive always sees the paged layout (a dense cache is passed as one block per
sequence). It lowers to `mla_decode_shard_p` (`jax_etap._lowering`: the reference or the
kernel) on each device's shards, and nothing is gathered:

* where the arguments' layouts are part of their types (Explicit mesh axes,
  `jax.make_mesh`'s default), they are known when the call is lowered: it lowers to a
  `jax.shard_map` of `mla_decode_shard_p` over the `ShardPlan` read off the types (which
  the shape rule has already validated, at trace time);
* otherwise (Auto mesh axes, the classic `jax.jit` with `NamedSharding` inputs), XLA
  learns the layouts only when it partitions the compiled program, so the call lowers to
  a `custom_partitioning` call. Shardy propagates layouts through it with
  `SHARDING_RULE` (batch and heads pass through from q to the outputs); XLA's partitioner
  then calls `_partition` with the layouts it chose, where a `ShardPlan` validates them (a
  refused layout fails the compilation with the plan's message) and says which layouts
  the per-device computation needs (the partitioner reshards cache_seqlens and
  block_table to them).

On one device, or inside a `shard_map` that is manual over every mesh axis,
custom_partitioning lowers straight to its body (`mla_decode_shard_p` on the arguments).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import dispatch  # no public API says "this primitive's lowering needs the devices"
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir, xla
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jax_etap._lowering import mla_decode_shard_p, shape_rule
from jax_etap._shard_plan import ShardPlan, layout_in_types, plan_layout, types_plan

mla_decode_p = Primitive("jax_etap_mla_decode")
mla_decode_p.multiple_results = True
mla_decode_p.def_impl(lambda *args, **params: xla.apply_primitive(mla_decode_p, *args, **params))
# The per-device primitive's shape rule: on one device the two agree on every shape, and
# on a mesh it validates the layouts in the types, at trace time.
mla_decode_p.def_abstract_eval(shape_rule)


# ---- batching rule ------------------------------------------------------------------------

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


# ---- lowering on a mesh ----------------------------------------------------------------

# Factors: b batch, s query tokens, h query heads, d head dim (q and cache), n pool blocks,
# t tokens per block, k KV heads, m blocks per sequence, v value channels. All are
# pass-through: Shardy must not replace the caller's layout of the cache or q with a
# replicated one (an all-gather); `_partition` refuses what it cannot compute in place.
SHARDING_RULE = "b s h d, n t k d, b, b m -> b s h v, b h s"

Params = tuple[tuple[str, Any], ...]  # the primitive's parameters, hashable (a static argument)


def _decode_shard(q, kv_cache, cache_seqlens, block_table, params: Params):
    return tuple(mla_decode_shard_p.bind(q, kv_cache, cache_seqlens, block_table, **dict(params)))


def _spec(arg: jax.ShapeDtypeStruct, name: str) -> PartitionSpec:
    sharding = arg.sharding
    if sharding is None:
        return PartitionSpec()
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            f"mla_decode under jit needs {name} laid out with a jax.sharding.NamedSharding on a Mesh, "
            f"got {sharding}. Put the arguments on the mesh with NamedSharding (or use jax_etap.sharding.shard_map_decode)."
        )
    return sharding.spec


def _plan(mesh, arg_shapes) -> ShardPlan:
    q, kv_cache = arg_shapes[0], arg_shapes[1]
    # The primitive only sees a pool: a dense cache arrives as one block per sequence.
    return plan_layout(dict(mesh.shape), q.shape, _spec(q, "q"), kv_cache.shape, _spec(kv_cache, "kv_cache"), dense=None)


def _named(mesh, specs) -> tuple[NamedSharding, ...]:
    return tuple(NamedSharding(mesh, spec) for spec in specs)


def _partition(params: Params, mesh, arg_shapes, result_shape):
    """XLA's partitioner asks: given these layouts, what does each device compute?

    Returns the mesh, the per-device function (on local shapes), the results' layouts
    and the layouts the arguments must have (XLA reshards cache_seqlens and block_table
    to them). Raises the plan's ValueError for a refused layout, which fails compilation.
    """
    plan = _plan(mesh, arg_shapes)
    per_shard = plan.per_shard(functools.partial(_decode_shard, params=params))
    return mesh, per_shard, _named(mesh, plan.out_specs()), _named(mesh, plan.in_specs())


def _infer_out_shardings(params: Params, mesh, arg_shapes, result_shape):
    """The results' layouts, for the deprecated GSPMD partitioner (Shardy uses the rule)."""
    return _named(mesh, _plan(mesh, arg_shapes).out_specs())


_decode_partitioned = custom_partitioning(_decode_shard, static_argnums=(4,))
_decode_partitioned.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer_out_shardings,
    sharding_rule=SHARDING_RULE,
)


def _explicit_call(q, kv_cache, params: Params):
    """The call as a shard_map over the plan read off the types of q and the cache."""
    plan, mesh = types_plan(q, kv_cache), q.sharding.mesh
    explicit = frozenset(name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit)
    mapped = plan.shard_map(functools.partial(_decode_shard, params=params), mesh, axis_names=explicit)

    def call(*args):
        # shard_map wants its inputs laid out as it says: q and the cache already are, while
        # cache_seqlens and block_table may still have to follow q's batch (a local slice
        # of replicated ones).
        return mapped(*(jax.reshard(x, NamedSharding(mesh, spec)) for x, spec in zip(args, plan.in_specs())))

    return call


def _mesh_lowering(ctx, q, kv_cache, cache_seqlens, block_table, **params):
    """Explicit mesh axes: a shard_map over the plan in the types; else custom partitioning."""
    params = tuple(sorted(params.items()))
    q_aval, kv_aval = ctx.avals_in[:2]
    if layout_in_types(q_aval):
        call = _explicit_call(q_aval, kv_aval, params)
    else:
        call = lambda *args: _decode_partitioned(*args, params)  # noqa: E731
    return mlir.lower_fun(call, multiple_results=True)(ctx, q, kv_cache, cache_seqlens, block_table)


mlir.register_lowering(mla_decode_p, _mesh_lowering)
# custom_partitioning needs the device assignment while lowering; jax passes it only to
# programs holding a primitive in this set (it cannot see into our lowering).
dispatch.prim_requires_devices_during_lowering.add(mla_decode_p)
