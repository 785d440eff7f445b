"""Sharded mla_decode: the layout plan (here, on one device) and the multi-device checks.

The plan's rules and errors are checked directly with made-up mesh sizes. Running on a
mesh needs 8 devices, and jax fixes its device count when its backend starts (this
process has one), so tests/sharded_checks.py runs in a fresh Python process with 8 CPU
host devices (JAX_PLATFORMS=cpu there, also on a GPU machine).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_devices import run_on_8_host_devices
from jax.sharding import PartitionSpec as P

import jax_etap
from jax_etap._shard_plan import ShardPlan, plan_layout

AXES = {"data": 2, "model": 4, "pod": 1}
Q, POOL, DENSE = (4, 2, 8, 64), (28, 16, 1, 64), (4, 96, 1, 64)


def _plan(q_spec, kv_spec, *, q_shape=Q, kv_shape=POOL, dense=False):
    return plan_layout(AXES, q_shape, q_spec, kv_shape, kv_spec, dense=dense)


@pytest.mark.parametrize(
    "q_spec,kv_spec,expected",
    [
        (P(), P(), ShardPlan()),
        (P("data", None, "model"), P(), ShardPlan(("data",), ("model",))),
        (P("data", None, "model"), P("data"), ShardPlan(("data",), ("model",), pool_sharded=True)),
        (P(None, None, ("data", "model")), P(), ShardPlan((), ("data", "model"))),
        # An axis of size 1 splits nothing and is left out.
        (P("pod", None, ("pod", "model")), P("pod", "pod"), ShardPlan((), ("model",))),
    ],
)
def test_plan_of_supported_layouts(q_spec, kv_spec, expected):
    assert _plan(q_spec, kv_spec) == expected


def test_plan_specs():
    plan = ShardPlan(("data",), ("model", "pod"), pool_sharded=True, kv_heads_sharded=True)
    assert plan.in_specs() == (
        P("data", None, ("model", "pod"), None),
        P("data", None, ("model", "pod"), None),
        P("data"),
        P("data", None),
    )
    assert plan.out_specs() == (P("data", None, ("model", "pod"), None), P("data", ("model", "pod"), None))
    assert ShardPlan().in_specs()[1] == P(None, None, None, None)


def test_plan_of_grouped_query_heads():
    gqa_q, gqa_kv = (4, 2, 8, 64), (28, 16, 4, 64)
    plan = _plan(P(None, None, "model"), P(None, None, "model"), q_shape=gqa_q, kv_shape=gqa_kv)
    assert plan == ShardPlan((), ("model",), kv_heads_sharded=True)


@pytest.mark.parametrize(
    "q_spec,kv_spec,kwargs,match",
    [
        (P(None, "data"), P(), {}, r"q is sharded along dimension 1 \(s_q\) over mesh axes \('data',\)"),
        (P(None, None, None, "model"), P(), {}, r"q is sharded along dimension 3 \(d_qk\)"),
        (P(), P(None, "model"), {}, r"kv_cache is sharded along dimension 1 \(tokens: block_size\)"),
        (P(), P(None, "model"), dict(kv_shape=DENSE, dense=True), r"dimension 1 \(tokens: s_k\)"),
        (P(), P(None, "model"), dict(dense=None), r"\(tokens: block_size, or s_k for a dense cache\)"),
        (P(), P(None, None, None, "data"), {}, r"kv_cache is sharded along dimension 3 \(d_qk\)"),
        (P("data"), P("model"), {}, r"dimension 0 \(num_blocks\) is sharded over mesh axes \('model',\), but q's batch"),
        (P("data"), P(("data", "model")), {}, r"is sharded over mesh axes \('data', 'model'\), but q's batch is sharded over \('data',\)"),
        (P("data"), P("data"), dict(kv_shape=(27, 16, 1, 64)), r"dimension 0 \(num_blocks\) = 27 is split over mesh axes \('data',\) of 2"),
        (P("data"), P(), dict(q_shape=(3, 2, 8, 64)), r"q's batch 3 is split over mesh axes \('data',\) of 2 devices"),
        (P(None, None, "model"), P(), dict(q_shape=(4, 2, 6, 64)), r"h_q = 6 heads are split over mesh axes \('model',\) of 4"),
        (P(None, None, "model"), P(None, None, "model"), dict(kv_shape=(28, 16, 2, 64)), r"splits KV-head groups \(h_kv = 2, 4 query heads per KV head\)"),
        (P(None, None, "data"), P(), dict(kv_shape=(28, 16, 2, 64)), r"kv_cache's h_kv = 2 dimension \(2\) must be sharded over the same axes"),
        (P(None, None, "data"), P(None, None, "model"), dict(kv_shape=(28, 16, 8, 64)), r"must be sharded over the same axes"),
        (P(), P("batch"), {}, r"names 'batch', which is not a mesh axis"),
        (P(None, None, None, None, "data"), P(), {}, r"q's partition spec .* has more entries than its rank 4"),
    ],
)
def test_plan_refuses_layouts_that_need_other_devices_data(q_spec, kv_spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _plan(q_spec, kv_spec, **kwargs)


def test_local_block_table():
    """Batch shard i of a pool split 2 ways holds blocks [7 i, 7 i + 7): its indices
    become local, the others -1 (never read, NaN if used). vmap stands in for the mesh axis."""
    table = jnp.asarray([[0, 6, 7, 13, -1, 14, 99]] * 2, jnp.int32)
    local = jax.vmap(lambda t: ShardPlan(("data",), pool_sharded=True).local_block_table(t, 7), axis_name="data")(table)
    np.testing.assert_array_equal(local, [[0, 6, -1, -1, -1, -1, -1], [-1, -1, 0, 6, -1, -1, -1]])
    assert ShardPlan(("data",)).local_block_table(table, 7) is table


CHECKS = Path(__file__).with_name("sharded_checks.py")
SHARDED_CHECKS = 69


def test_sharded_checks_on_8_host_devices():
    """tests/sharded_checks.py, run by pytest in a process with 8 CPU host devices."""
    proc, summary, report = run_on_8_host_devices(CHECKS)
    assert proc.returncode == 0, report
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    skipped = int(m.group(1)) if (m := re.search(r"(\d+) skipped", summary)) else 0
    # Every check runs: only the two CUDA-lowering checks skip, and only without a CUDA
    # build. The total is sharded_checks.py's count of checks: update it with them.
    assert skipped == (0 if jax_etap.build_info()["cuda"] else 2), report
    assert passed + skipped == SHARDED_CHECKS, report
