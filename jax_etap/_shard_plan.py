"""Which layouts of `mla_decode`'s arguments on a device mesh can be computed shard by shard.

Every way of running `mla_decode` on sharded inputs (the primitive's lowering, by custom
partitioning under Auto mesh axes or a shard_map under Explicit ones; its abstract
evaluation, which puts the results' layouts in Explicit types; the ``shard_map`` helper in
`jax_etap.sharding`) asks this module for a `ShardPlan`: it validates the layout, says how
each argument and result is laid out, and runs a decode function shard by shard, with
block tables rewritten for a per-shard pool.

A plan splits the computation only where no data has to move between devices:

* q's batch over some mesh axes (the "batch axes"): cache_seqlens and block_table follow
  it; the KV cache is either replicated along those axes or split along its first
  dimension over exactly the same axes (a per-shard pool, see `local_block_table`);
* q's heads over other mesh axes (the "head axes"): with h_kv = 1 (MLA) the cache is
  replicated along them and every shard attends to the one latent head; with h_kv > 1
  the cache's h_kv dimension must be split over the same axes, so that each shard holds
  whole KV-head groups and the KV heads they read.

Anything else would need q or the cache gathered from other devices, and is refused
with a `ValueError` naming the argument, its layout and what would work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

Axes = tuple[str, ...]
DecodeResult = tuple[jax.Array, jax.Array]  # (out, lse)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How one decode call is split over a mesh (mesh axes of size 1 are left out).

    Attributes:
      batch_axes: mesh axes q's batch is split over (cache_seqlens and block_table too).
      head_axes: mesh axes q's query heads are split over.
      pool_sharded: the cache's first dimension (num_blocks, or batch for a dense cache)
        is split over ``batch_axes``: each batch shard holds the pool of its sequences.
      kv_heads_sharded: the cache's h_kv dimension is split over ``head_axes``.
    """

    batch_axes: Axes = ()
    head_axes: Axes = ()
    pool_sharded: bool = False
    kv_heads_sharded: bool = False

    def in_specs(self) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec, PartitionSpec]:
        """Specs of (q, kv_cache, cache_seqlens, block_table) this plan computes on."""
        batch, heads = _entry(self.batch_axes), _entry(self.head_axes)
        pool = batch if self.pool_sharded else None
        kv_heads = heads if self.kv_heads_sharded else None
        return (
            PartitionSpec(batch, None, heads, None),
            PartitionSpec(pool, None, kv_heads, None),
            PartitionSpec(batch),
            PartitionSpec(batch, None),
        )

    def out_specs(self) -> tuple[PartitionSpec, PartitionSpec]:
        """Specs of (out ``[batch, s_q, h_q, dv]``, lse ``[batch, h_q, s_q]``)."""
        batch, heads = _entry(self.batch_axes), _entry(self.head_axes)
        return PartitionSpec(batch, None, heads, None), PartitionSpec(batch, heads, None)

    def shard_map(
        self, decode: Callable[..., DecodeResult], mesh: Any, *, axis_names: frozenset[str] = frozenset()
    ) -> Callable[..., DecodeResult]:
        """`jax.shard_map` of `per_shard` over ``mesh`` (over ``axis_names``; default all)."""
        return jax.shard_map(
            self.per_shard(decode), mesh=mesh, in_specs=self.in_specs(), out_specs=self.out_specs(), axis_names=axis_names
        )

    def per_shard(self, decode: Callable[..., DecodeResult]) -> Callable[..., DecodeResult]:
        """``decode(q, kv_cache, cache_seqlens, block_table)`` on one shard's arrays, with
        the block table made local (`local_block_table`). To be called inside a map over
        the mesh's axes."""

        def run(q, kv_cache, cache_seqlens, block_table):
            return decode(q, kv_cache, cache_seqlens, self.local_block_table(block_table, kv_cache.shape[0]))

        return run

    def local_block_table(self, block_table: jax.Array, local_num_blocks: int) -> jax.Array:
        """This shard's block table, to be called inside a map over the mesh's axes.

        Tables hold global block indices, as in an unsharded call. With a per-shard pool,
        batch shard i holds blocks ``[i * local_num_blocks, (i + 1) * local_num_blocks)``;
        their indices become local, and any other index becomes -1, which the decode
        treats like any out-of-range block (never read; if the sequence uses it, its
        outputs are NaN). So the result equals the unsharded call exactly when every
        sequence uses only blocks held by its own batch shard, and is visibly NaN
        otherwise. A dense cache split over the batch always satisfies this.
        """
        if not self.pool_sharded:
            return block_table
        first = jax.lax.axis_index(self.batch_axes) * local_num_blocks
        held = (block_table >= first) & (block_table < first + local_num_blocks)
        return jnp.where(held, block_table - first, -1)


def _entry(axes: Axes) -> str | Axes | None:
    """A PartitionSpec entry for a dimension split over ``axes``."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _dims(name: str, spec: Any, rank: int, axis_sizes: Mapping[str, int]) -> tuple[Axes, ...]:
    """The mesh axes of size > 1 each of the ``rank`` dimensions of ``spec`` is split over."""
    entries = tuple(spec) if spec is not None else ()
    if len(entries) > rank:
        raise ValueError(f"{name}'s partition spec {spec} has more entries than its rank {rank}")
    dims = []
    for entry in entries + (None,) * (rank - len(entries)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for axis in axes:
            if not isinstance(axis, str) or axis not in axis_sizes:
                raise ValueError(f"{name}'s partition spec {spec} names {axis!r}, which is not a mesh axis")
        dims.append(tuple(a for a in axes if axis_sizes[a] > 1))
    return tuple(dims)


def _split_count(axes: Axes, axis_sizes: Mapping[str, int]) -> int:
    return math.prod(axis_sizes[a] for a in axes)


def _require_unsplit(name: str, spec: Any, dims: tuple[Axes, ...], which: Mapping[int, str], remedy: str) -> None:
    for dim, label in which.items():
        if dims[dim]:
            raise ValueError(
                f"{name} is sharded along dimension {dim} ({label}) over mesh axes {dims[dim]} "
                f"(partition spec {spec}); mla_decode would have to gather it from other devices. {remedy}"
            )


def plan_layout(
    axis_sizes: Mapping[str, int],
    q_shape: tuple[int, ...],
    q_spec: Any,
    kv_shape: tuple[int, ...],
    kv_spec: Any,
    *,
    dense: bool | None,
) -> ShardPlan:
    """The plan for q and kv_cache with these global shapes and partition specs, or a ValueError.

    cache_seqlens and block_table are not constrained: the plan lays them out like q's
    batch (a local slice when they arrive replicated; they are small either way).

    Args:
      axis_sizes: the mesh's axis names and sizes.
      q_shape, q_spec: q's global shape and partition spec.
      kv_shape, kv_spec: the cache's global shape and partition spec.
      dense: whether the cache is dense ``[batch, s_k, h_kv, d]``, or None where that is not
        known (the primitive sees every cache as a pool). It only changes the wording of
        errors: a dense cache is planned as a pool of one block per sequence.
    """
    batch, _, h_q, _ = q_shape
    num_blocks, _, h_kv, _ = kv_shape
    q_dims = _dims("q", q_spec, 4, axis_sizes)
    kv_dims = _dims("kv_cache", kv_spec, 4, axis_sizes)

    _require_unsplit(
        "q", q_spec, q_dims, {1: "s_q", 3: "d_qk"},
        "Shard q only along dimensions 0 (batch) and 2 (h_q).",
    )
    first, tokens = {True: ("batch", "s_k"), False: ("num_blocks", "block_size")}.get(
        dense, ("num_blocks, or batch for a dense cache", "block_size, or s_k for a dense cache")
    )
    _require_unsplit(
        "kv_cache", kv_spec, kv_dims, {1: f"tokens: {tokens}", 3: "d_qk"},
        f"Replicate it, or shard only its dimension 0 ({first}) like q's batch and its dimension 2 (h_kv) like q's heads.",
    )

    batch_axes, head_axes = q_dims[0], q_dims[2]
    n_batch, n_heads = _split_count(batch_axes, axis_sizes), _split_count(head_axes, axis_sizes)
    if batch % n_batch:
        raise ValueError(f"q's batch {batch} is split over mesh axes {batch_axes} of {n_batch} devices, which does not divide it")
    if h_q % n_heads:
        raise ValueError(f"q's h_q = {h_q} heads are split over mesh axes {head_axes} of {n_heads} devices, which does not divide them")

    pool_axes = kv_dims[0]
    if pool_axes and pool_axes != batch_axes:
        raise ValueError(
            f"kv_cache's dimension 0 ({first}) is sharded over mesh axes {pool_axes}, but q's batch is sharded over "
            f"{batch_axes or 'no axes'} (q spec {q_spec}, kv_cache spec {kv_spec}). The cache may be split along "
            f"dimension 0 only over exactly q's batch axes (each batch shard then holds its own sequences' blocks), or replicated."
        )
    if pool_axes and num_blocks % n_batch:
        raise ValueError(f"kv_cache's dimension 0 ({first}) = {num_blocks} is split over mesh axes {pool_axes} of {n_batch} devices, which does not divide it")

    kv_head_axes = kv_dims[2]
    if head_axes and h_kv > 1:
        if h_kv % n_heads:
            raise ValueError(
                f"q's h_q = {h_q} heads are split {n_heads} ways over mesh axes {head_axes}, which splits KV-head groups "
                f"(h_kv = {h_kv}, {h_q // h_kv} query heads per KV head): the number of head shards must divide h_kv"
            )
        if kv_head_axes != head_axes:
            raise ValueError(
                f"q's heads are sharded over mesh axes {head_axes}, so kv_cache's h_kv = {h_kv} dimension (2) must be "
                f"sharded over the same axes, so that each device holds the KV heads of its query heads; "
                f"got kv_cache spec {kv_spec}"
            )
    elif kv_head_axes:
        raise ValueError(
            f"kv_cache's h_kv dimension (2) is sharded over mesh axes {kv_head_axes} (spec {kv_spec}), but q's heads are "
            f"sharded over {head_axes or 'no axes'} (spec {q_spec}): shard q's heads over the same axes, or replicate the cache's heads"
        )

    return ShardPlan(
        batch_axes=batch_axes,
        head_axes=head_axes,
        pool_sharded=bool(pool_axes),
        kv_heads_sharded=bool(head_axes and h_kv > 1),
    )


def layout_in_types(aval: Any) -> bool:
    """Whether layouts on ``aval``'s mesh are part of the types: the mesh has Explicit axes
    and no Auto ones (Manual axes, inside a shard_map, are already split)."""
    kinds = set(aval.sharding.mesh.axis_types)
    return AxisType.Explicit in kinds and AxisType.Auto not in kinds


def types_plan(q: Any, kv_cache: Any) -> ShardPlan:
    """The plan read off the types (avals) of q and the cache, under Explicit mesh axes."""
    mesh = q.sharding.mesh
    return plan_layout(dict(mesh.shape), q.shape, q.sharding.spec, kv_cache.shape, kv_cache.sharding.spec, dense=None)


def result_shardings(q: Any, kv_cache: Any | None = None) -> tuple[NamedSharding, NamedSharding]:
    """The shardings in the types of (out, lse), given the types (avals) of q and the cache.

    Under Explicit mesh axes the results are laid out like q's batch and heads. Given the
    cache, the layout is validated first, so one the plan refuses raises its ValueError
    here, at trace time; without it (the jnp reference, which XLA partitions) any layout
    goes. Otherwise (Auto axes, inside a shard_map, one device) the types carry no split.
    """
    mesh = q.sharding.mesh
    plan = ShardPlan()
    if layout_in_types(q) and kv_cache is not None:
        plan = types_plan(q, kv_cache)
    elif layout_in_types(q):
        q_dims = _dims("q", q.sharding.spec, 4, dict(mesh.shape))
        plan = ShardPlan(batch_axes=q_dims[0], head_axes=q_dims[2])
    out_spec, lse_spec = plan.out_specs()
    return NamedSharding(mesh, out_spec), NamedSharding(mesh, lse_spec)
