"""The lowering of `mla_decode_p` on a mesh: each device computes its shards, nothing is gathered.

Where the arguments' layouts are part of their types (Explicit mesh axes, `jax.make_mesh`'s
default), they are known when the call is lowered: it lowers to a `jax.shard_map` of
`mla_decode_shard_p` over the `ShardPlan` read off the types (which the primitive's
abstract evaluation has already validated, at trace time).

Otherwise (Auto mesh axes, the classic `jax.jit` with `NamedSharding` inputs), XLA
learns the layouts only when it partitions the compiled program, so the call lowers to
a `custom_partitioning` call:

* Shardy propagates layouts through it with `SHARDING_RULE` (batch and heads pass
  through from q to the outputs);
* XLA's partitioner then calls `_partition` with the layouts it chose; a `ShardPlan`
  validates them (a refused layout fails the compilation with the plan's message) and
  says which layouts the per-device computation needs (the partitioner reshards
  cache_seqlens and block_table to them); the per-device computation is
  `mla_decode_shard_p` on local shapes.

Either way `mla_decode_shard_p`'s per-platform lowering then picks the kernel or the
reference, as on one device. On one device, or inside a `shard_map` that is manual over
every mesh axis, custom_partitioning lowers straight to its body (`mla_decode_shard_p` on
the arguments). Importing this module registers the lowering.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax._src import dispatch  # no public API says "this primitive's lowering needs the devices"
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jax_etap._primitive import mla_decode_p, mla_decode_shard_p
from jax_etap._shard_plan import ShardPlan, layout_in_types, plan_layout, types_plan

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


def _lowering(ctx, q, kv_cache, cache_seqlens, block_table, **params):
    """Explicit mesh axes: a shard_map over the plan in the types; else custom partitioning."""
    params = tuple(sorted(params.items()))
    q_aval, kv_aval = ctx.avals_in[:2]
    if layout_in_types(q_aval):
        call = _explicit_call(q_aval, kv_aval, params)
    else:
        call = lambda *args: _decode_partitioned(*args, params)  # noqa: E731
    return mlir.lower_fun(call, multiple_results=True)(ctx, q, kv_cache, cache_seqlens, block_table)


mlir.register_lowering(mla_decode_p, _lowering)
# custom_partitioning needs the device assignment while lowering; jax passes it only to
# programs holding a primitive in this set (it cannot see into our lowering).
dispatch.prim_requires_devices_during_lowering.add(mla_decode_p)
