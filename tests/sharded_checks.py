"""mla_decode on a 2 x 4 mesh of CPU host devices: sharded calls equal unsharded ones, with no
communication, and layouts that would need any are refused with the documented errors.

jax fixes its device count when its backend starts, and the rest of the suite runs on one
device, so tests/test_sharding.py runs this file in a fresh process with 8 host devices.
To run it alone, from the repository root:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu pytest tests/sharded_checks.py

Every check runs under both kinds of mesh axes: Auto (layouts not in the types; mla_decode
is custom-partitioned when XLA compiles) and Explicit (layouts in the types; jax.make_mesh's
default). "Equal" is mla_cases.assert_same_result against the same call on one device.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from mla_cases import assert_same_result, make_case

import jax_etap
from jax_etap import _primitive
from jax_etap.sharding import shard_map_decode
from jax_etap.testing import shuffled_block_table

if jax.device_count() != 8:
    raise RuntimeError(f"these checks need 8 devices, found {jax.devices()}: run them as the module docstring says")

# Any cross-device operation in compiled HLO text (async ones appear as e.g. all-gather-start).
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|ragged-all-to-all|collective-permute|reduce-scatter|collective-broadcast)")
# A kernel custom call's operand types: the last "(...) ->" of its line.
KERNEL_CALL = re.compile(r"stablehlo\.custom_call @jax_etap_mla_decode_v2\(.*: \(([^()]*)\) ->")

MODES = [AxisType.Auto, AxisType.Explicit]
DATA, MODEL, BOTH = "data", "model", ("data", "model")


@pytest.fixture(params=MODES, ids=["auto", "explicit"])
def mesh(request):
    return jax.make_mesh((2, 4), (DATA, MODEL), axis_types=(request.param,) * 2)


def _decode(**kwargs):
    kwargs = {"head_dim_v": 64, "causal": True, **kwargs}

    def f(q, kv_cache, cache_seqlens, block_table=None):
        return jax_etap.mla_decode(q, kv_cache, cache_seqlens, block_table, **kwargs)

    return f


def _case(rng, *, batch=4, h_q=8, h_kv=1, d_qk=64, head_dim_v=64, dense=False, s_q=2):
    lengths = (0, 37, 64, 90, 5, 17, 80, 1)[:batch]
    return make_case(
        rng, seqlens=lengths, s_q=s_q, h_q=h_q, h_kv=h_kv, d_qk=d_qk, head_dim_v=head_dim_v, causal=True,
        block_size=None if dense else 16, capacity=96, spare_blocks=4,  # a pool of 28 blocks
    )


def _tables_within_shards(rng, case, shards):
    """The case with a new block table in which batch shard i's sequences use only blocks of
    the i-th slice of the pool (what a pool split over the batch axes requires)."""
    batch, per_seq = case.block_table.shape
    pool = case.kv_cache.shape[0] // shards * shards
    key = jax.random.key(int(rng.integers(2**31)))
    return case.replace(block_table=shuffled_block_table(key, batch, per_seq, pool, shards))


def _place(mesh, args, specs):
    return tuple(None if x is None else jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs))


def _compile(mesh, fn, args):
    """jit(fn) on args placed on the mesh: (result, compiled HLO text)."""
    with jax.set_mesh(mesh):
        jitted = jax.jit(fn)
        return jitted(*args), jitted.lower(*args).compile().as_text()


def _collectives(hlo: str) -> list[str]:
    return sorted(set(COLLECTIVE.findall(hlo)))


def _check_result_layout(mesh, result, q_spec):
    """out is split like q's batch and heads, lse like q's batch and heads too."""
    q_spec = tuple(q_spec) + (None,) * (4 - len(q_spec))
    out, lse = result
    for x, spec in ((out, P(q_spec[0], None, q_spec[2], None)), (lse, P(q_spec[0], q_spec[2], None))):
        expected = NamedSharding(mesh, spec)
        assert x.sharding.is_equivalent_to(expected, x.ndim), f"{x.sharding} != {expected}"
        assert x.addressable_shards[0].data.shape == expected.shard_shape(x.shape)


# (id, case arguments, specs of q, kv_cache, cache_seqlens, block_table, pool split over the batch)
SUPPORTED = [
    pytest.param(dict(), (P(None, None, MODEL), P(), P(), P()), False, id="heads"),
    pytest.param(dict(), (P(DATA), P(), P(DATA), P(DATA)), False, id="batch"),
    # cache_seqlens and block_table arrive replicated: each device takes its rows locally.
    pytest.param(dict(), (P(DATA, None, MODEL), P(), P(), P()), False, id="batch-heads"),
    pytest.param(dict(), (P(DATA, None, MODEL), P(DATA), P(DATA), P(DATA)), True, id="batch-heads-pool-per-batch-shard"),
    # DeepSeek's layout: 576-channel latent cache, heads split 8 ways over both axes.
    pytest.param(dict(h_q=16, d_qk=576, head_dim_v=512), (P(None, None, BOTH), P(), P(), P()), False, id="mla576-heads-8-way"),
    pytest.param(dict(batch=8), (P(BOTH), P(), P(BOTH), P(BOTH)), False, id="batch-8-way"),
    pytest.param(dict(dense=True), (P(DATA, None, MODEL), P(), P(DATA), None), False, id="dense-replicated"),
    pytest.param(dict(dense=True), (P(DATA, None, MODEL), P(DATA), P(DATA), None), False, id="dense-split-over-batch"),
    # GQA: each device holds one of the two KV heads and its 4 query heads.
    pytest.param(dict(h_kv=2), (P(MODEL, None, DATA), P(None, None, DATA), P(MODEL), P(MODEL)), False, id="gqa-kv-heads-split"),
]


@pytest.mark.parametrize("spec,specs,pool_split", SUPPORTED)
def test_supported_layout_equals_unsharded_without_communication(rng, mesh, spec, specs, pool_split):
    case = _case(rng, **spec)
    if pool_split:
        case = _tables_within_shards(rng, case, mesh.shape[DATA])
    f = _decode(head_dim_v=case.head_dim_v)
    unsharded = jax.jit(f)(*case.args)
    sharded, hlo = _compile(mesh, f, _place(mesh, case.args, specs))
    assert _collectives(hlo) == [], "a supported layout communicates"
    _check_result_layout(mesh, sharded, specs[0])
    assert_same_result(sharded, unsharded)


def test_collective_detector_sees_a_gather(rng):
    """The check above can fail: the jnp reference (implementation="xla"), which XLA
    partitions by its generic rules, gathers a cache split along its tokens."""
    mesh = jax.make_mesh((2, 4), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2)
    case = _case(rng)
    f = _decode(implementation="xla")
    sharded, hlo = _compile(mesh, f, _place(mesh, case.args, (P(DATA, None, MODEL), P(None, MODEL), P(), P())))
    assert "all-gather" in _collectives(hlo)
    assert_same_result(sharded, jax.jit(f)(*case.args))


@pytest.mark.parametrize(
    "kv_spec", [P(), P(None, MODEL)], ids=["supported-layout", "cache-split-along-tokens"]
)
def test_xla_implementation_is_partitioned_by_xla(rng, mesh, kv_spec):
    """implementation="xla" accepts any layout (XLA may communicate) and equals the unsharded call."""
    case = _case(rng)
    f = _decode(implementation="xla")
    sharded, _ = _compile(mesh, f, _place(mesh, case.args, (P(DATA, None, MODEL), kv_spec, P(DATA), P(DATA))))
    _check_result_layout(mesh, sharded, P(DATA, None, MODEL))
    assert_same_result(sharded, jax.jit(f)(*case.args))


UNSUPPORTED = [
    pytest.param(dict(), (P(DATA, None, MODEL), P(None, MODEL)), r"kv_cache is sharded along dimension 1 \(tokens", id="cache-tokens"),
    pytest.param(dict(), (P(DATA), P(None, None, None, MODEL)), r"kv_cache is sharded along dimension 3 \(d_qk\)", id="cache-d"),
    pytest.param(dict(), (P(DATA, None, None, MODEL), P()), r"q is sharded along dimension 3 \(d_qk\)", id="q-d"),
    pytest.param(dict(), (P(None, DATA, MODEL), P()), r"q is sharded along dimension 1 \(s_q\)", id="q-s_q"),
    pytest.param(
        dict(), (P(DATA, None, MODEL), P(MODEL)),
        r"kv_cache's dimension 0 \(num_blocks.*\) is sharded over mesh axes \('model',\), but q's batch is sharded over \('data',\)",
        id="pool-split-over-a-head-axis",
    ),
    pytest.param(dict(), (P(None, None, MODEL), P(DATA)), r"but q's batch is sharded over no axes", id="pool-split-batch-not"),
    pytest.param(dict(h_kv=2), (P(None, None, MODEL), P()), r"which splits KV-head groups \(h_kv = 2", id="gqa-group-split"),
    pytest.param(dict(h_kv=2), (P(None, None, DATA), P()), r"must be sharded over the same axes", id="gqa-kv-heads-replicated"),
    pytest.param(dict(h_kv=2), (P(), P(None, None, DATA)), r"kv_cache's h_kv dimension \(2\) is sharded", id="kv-heads-split-q-not"),
]


@pytest.mark.parametrize("spec,specs,match", UNSUPPORTED)
def test_unsupported_layout_is_refused(rng, mesh, spec, specs, match):
    """Explicit axes: ValueError when traced. Auto axes: the layouts are known only when XLA
    partitions, so compilation fails (JaxRuntimeError) with the same message."""
    case = _case(rng, **spec)
    args = _place(mesh, case.args, specs + (P(), P()))
    f = jax.jit(_decode())
    with jax.set_mesh(mesh):
        if mesh.axis_types[0] == AxisType.Explicit:
            with pytest.raises(ValueError, match=match):
                f.trace(*args)
        else:
            with pytest.raises(jax.errors.JaxRuntimeError, match=match):
                f.lower(*args).compile()


def test_block_of_another_batch_shard_gives_nan(rng, mesh):
    """With the pool split over the batch, a sequence that uses a block held by another
    batch shard is NaN (like an out-of-range block); the other sequences are unaffected."""
    case = _tables_within_shards(rng, _case(rng), 2)
    table = np.asarray(case.block_table).copy()
    table[3, 1] = table[0, 0]  # sequence 3 (batch shard 1) borrows a block of shard 0; it uses 6 blocks
    case = case.replace(block_table=jnp.asarray(table))
    f = _decode()
    sharded, _ = _compile(mesh, f, _place(mesh, case.args, (P(DATA, None, MODEL), P(DATA), P(DATA), P(DATA))))
    unsharded = jax.jit(f)(*case.args)
    (out, lse), (ref_out, ref_lse) = (tuple(np.asarray(x.astype(jnp.float32)) for x in r) for r in (sharded, unsharded))
    assert np.isnan(out[3]).all() and np.isnan(lse[3]).all()
    assert np.isfinite(ref_lse[3]).any(), "the unsharded call reads the borrowed block"
    assert_same_result((out[:3], lse[:3]), (ref_out[:3], ref_lse[:3]))


def test_vmap_with_the_mapped_axis_split_over_the_batch_axis(rng, mesh):
    """vmap folds the mapped axis into the batch ahead of it: split over the batch axes,
    it stays a split of the folded batch, with no communication."""
    cases = [_case(rng) for _ in range(2)]
    pool = cases[0].kv_cache
    q, seqlens, table = (jnp.stack(x) for x in zip(*[(c.q, c.cache_seqlens, c.block_table) for c in cases]))
    f = jax.vmap(_decode(), in_axes=(0, None, 0, 0))
    args = _place(mesh, (q, pool, seqlens, table), (P(DATA, None, None, MODEL), P(), P(DATA), P(DATA)))
    sharded, hlo = _compile(mesh, f, args)
    assert _collectives(hlo) == []
    assert_same_result(sharded, jax.jit(f)(q, pool, seqlens, table))


def test_eager_call_on_sharded_arrays(rng, mesh):
    case = _case(rng)
    f = _decode()
    with jax.set_mesh(mesh):
        sharded = f(*_place(mesh, case.args, (P(DATA, None, MODEL), P(), P(DATA), P(DATA))))
    _check_result_layout(mesh, sharded, P(DATA, None, MODEL))
    assert_same_result(sharded, jax.jit(f)(*case.args))


@pytest.mark.parametrize("dense", [False, True], ids=["paged", "dense"])
@pytest.mark.parametrize("shard_pool", [False, True], ids=["pool-replicated", "pool-split"])
def test_shard_map_decode_helper(rng, mesh, dense, shard_pool):
    case = _case(rng, dense=dense)
    if shard_pool and not dense:
        case = _tables_within_shards(rng, case, 2)
    helper = shard_map_decode(mesh, batch_axes=DATA, head_axes=MODEL, shard_pool=shard_pool, head_dim_v=64, causal=True)
    kv_spec = P(DATA) if shard_pool else P()
    args = _place(mesh, case.args, (P(DATA, None, MODEL), kv_spec, P(DATA), P(DATA)))
    sharded, hlo = _compile(mesh, helper, args)
    assert _collectives(hlo) == []
    _check_result_layout(mesh, sharded, P(DATA, None, MODEL))
    assert_same_result(sharded, jax.jit(_decode())(*case.args))


def test_hand_written_shard_map_recipe(rng):
    """The recipe of docs/sharding.md: inside shard_map each device calls mla_decode on its
    own arrays; with a replicated pool the global block tables are also the local ones."""
    mesh = jax.make_mesh((2, 4), (DATA, MODEL), axis_types=(AxisType.Explicit,) * 2)
    case = _case(rng)
    step = jax.shard_map(
        lambda q, kv, lens, table: jax_etap.mla_decode(q, kv, lens, table, head_dim_v=64, causal=True),
        mesh=mesh,
        in_specs=(P(DATA, None, MODEL), P(), P(DATA), P(DATA, None)),
        out_specs=(P(DATA, None, MODEL), P(DATA, MODEL)),
    )
    args = _place(mesh, case.args, (P(DATA, None, MODEL), P(), P(DATA), P(DATA, None)))
    sharded, hlo = _compile(mesh, step, args)
    assert _collectives(hlo) == []
    assert_same_result(sharded, jax.jit(_decode())(*case.args))


def test_export_round_trip(rng, mesh):
    """What jax.export serializes: with Explicit axes mla_decode itself (a shard_map once
    lowered), with Auto axes the shard_map helper (custom partitioning does not serialize)."""
    case = _case(rng)
    explicit = mesh.axis_types[0] == AxisType.Explicit
    f = _decode() if explicit else shard_map_decode(mesh, batch_axes=DATA, head_axes=MODEL, head_dim_v=64, causal=True)
    args = _place(mesh, case.args, (P(DATA, None, MODEL), P(), P(DATA), P(DATA)))
    with jax.set_mesh(mesh):
        exported = jax.export.export(jax.jit(f))(*args)
        restored = jax.export.deserialize(exported.serialize())
        sharded = restored.call(*args)
    assert_same_result(sharded, jax.jit(_decode())(*case.args))


def test_gspmd_partitioner(rng):
    """The deprecated GSPMD partitioner (jax_use_shardy_partitioner=False) gets the same
    partitioning through infer_sharding_from_operands."""
    mesh = jax.make_mesh((2, 4), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2)
    case = _case(rng)
    f = _decode()
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        sharded, hlo = _compile(mesh, f, _place(mesh, case.args, (P(DATA, None, MODEL), P(), P(DATA), P(DATA))))
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)
    assert _collectives(hlo) == []
    _check_result_layout(mesh, sharded, P(DATA, None, MODEL))
    assert_same_result(sharded, jax.jit(f)(*case.args))


def _kernel_operand_types(cuda_text: str) -> list[list[str]]:
    return [re.findall(r"tensor<[^>]*>", m) for m in KERNEL_CALL.findall(cuda_text)]


LOCAL_OPERANDS = ["tensor<2x2x2x64xbf16>", "tensor<28x16x1x64xbf16>", "tensor<2xi32>", "tensor<2x6xi32>"]


@pytest.mark.skipif(not jax_etap.build_info()["cuda"], reason="extension built without CUDA: no cuda lowering")
def test_cuda_lowering_with_explicit_axes_calls_the_kernel_on_local_shapes(rng):
    """Lowered for CUDA (on this CPU machine), the call is one kernel custom call inside a
    manual computation, on each device's shapes: q [4 -> 2, 2, 8 -> 2, 64], the whole pool."""
    mesh = jax.make_mesh((2, 4), (DATA, MODEL), axis_types=(AxisType.Explicit,) * 2)
    case = _case(rng, dense=False)
    args = _place(mesh, case.args, (P(DATA, None, MODEL), P(), P(DATA), P(DATA)))
    with jax.set_mesh(mesh):
        cuda = jax.jit(_decode()).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "sdy.manual_computation" in cuda
    assert _kernel_operand_types(cuda) == [LOCAL_OPERANDS]


@pytest.mark.skipif(not jax_etap.build_info()["cuda"], reason="extension built without CUDA: no cuda lowering")
def test_cuda_lowering_with_auto_axes_defers_to_the_partitioner(rng):
    """With Auto axes the lowered call is a custom-partitioning call on global shapes; the
    per-device computation its partition callback returns is the kernel on local shapes."""
    mesh = jax.make_mesh((2, 4), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2)
    case = _case(rng)
    specs = (P(DATA, None, MODEL), P(), P(DATA), P(DATA))
    args = _place(mesh, case.args, specs)
    with jax.set_mesh(mesh):
        cuda = jax.jit(_decode()).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "@CustomSPMDPartitioning" in cuda and not _kernel_operand_types(cuda)

    params = (("causal", True), ("head_dim_v", 64), ("implementation", "auto"), ("softmax_scale", 64**-0.5))
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in args]
    results = [jax.ShapeDtypeStruct((4, 2, 8, 64), jnp.bfloat16), jax.ShapeDtypeStruct((4, 8, 2), jnp.float32)]
    _, per_device, _, arg_shardings = _primitive._partition(params, mesh, shapes, results)
    local = [jax.ShapeDtypeStruct(s.shard_shape(x.shape), x.dtype) for s, x in zip(arg_shardings, args)]
    lowered = jax.jit(per_device).trace(*local).lower(lowering_platforms=("cuda",)).as_text()
    assert _kernel_operand_types(lowered) == [LOCAL_OPERANDS]


# An FP8 cache (jax_etap.fp8, uint8 [..., 656]) is dequantized where it lies, shard by shard.
FP8_LAYOUTS = [
    pytest.param(dict(), (P(None, None, BOTH), P(), P(), P()), False, id="heads-8-way"),
    pytest.param(dict(), (P(DATA, None, MODEL), P(DATA), P(DATA), P(DATA)), True, id="batch-heads-pool-per-batch-shard"),
    pytest.param(dict(dense=True), (P(DATA, None, MODEL), P(DATA), P(DATA), None), False, id="dense-split-over-batch"),
]


def _fp8_case(rng, **spec):
    case = _case(rng, h_q=8, d_qk=576, head_dim_v=512, **spec)
    return case.replace(kv_cache=jax_etap.fp8.quantize(case.kv_cache))


@pytest.mark.parametrize("spec,specs,pool_split", FP8_LAYOUTS)
def test_fp8_cache_sharded_equals_unsharded_without_communication(rng, mesh, spec, specs, pool_split):
    case = _fp8_case(rng, **spec)
    if pool_split:
        case = _tables_within_shards(rng, case, mesh.shape[DATA])
    f = _decode(head_dim_v=512)
    sharded, hlo = _compile(mesh, f, _place(mesh, case.args, specs))
    assert _collectives(hlo) == [], "an FP8 cache in a supported layout communicates"
    _check_result_layout(mesh, sharded, specs[0])
    assert_same_result(sharded, jax.jit(f)(*case.args))


def test_fp8_cache_with_the_shard_map_helper(rng, mesh):
    case = _tables_within_shards(rng, _fp8_case(rng), 2)
    helper = shard_map_decode(mesh, batch_axes=DATA, head_axes=MODEL, shard_pool=True, head_dim_v=512, causal=True)
    args = _place(mesh, case.args, (P(DATA, None, MODEL), P(DATA), P(DATA), P(DATA)))
    sharded, hlo = _compile(mesh, helper, args)
    assert _collectives(hlo) == []
    assert_same_result(sharded, jax.jit(_decode(head_dim_v=512))(*case.args))
