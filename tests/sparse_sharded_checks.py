"""mla_decode_sparse on a 2 x 4 mesh of CPU host devices: XLA partitions the jnp reference,
a sharded call equals the unsharded one, and splitting heads (or batch and heads) needs
no communication. The same for the path through mla_decode's kernels
(jax_etap._sparse_gathered), which a GPU takes by default: here it is made to think it is
on one (the default backend reported as "gpu"), and mla_decode's cpu lowering stands in for
the kernels.

tests/test_sparse.py runs this file in a fresh process with 8 host devices and checks the
number of tests that pass. To run it alone, from the repository root:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu pytest tests/sparse_sharded_checks.py

Every check runs under both kinds of mesh axes, Auto and Explicit.
"""

from __future__ import annotations

from contextlib import nullcontext

import jax
import pytest
from jax.sharding import PartitionSpec as P
from mla_cases import assert_same_result
from sharded_checks import BOTH, DATA, MODEL, MODES, _check_result_layout, _collectives, _compile, _place
from sparse_cases import assert_matches_sparse_oracle, make_sparse_case

import jax_etap

INF = float("inf")


@pytest.fixture(params=MODES, ids=["auto", "explicit"])
def mesh(request):
    return jax.make_mesh((2, 4), (DATA, MODEL), axis_types=(request.param,) * 2)


def _case(rng, h_q):
    case = make_sparse_case(
        rng, batch=4, s_q=2, h_q=h_q, topk=48, num_blocks=8, block_size=16, skipped=0.2,
        topk_length=(48, 0, 30, 100), attn_sink=[0.5, -INF, INF, 1.0] * (h_q // 4),
    )
    indices = case.indices.at[2, 1, 3].set(-5)  # one NaN row
    return case.replace(indices=indices)


def _decode(q, kv_cache, indices, topk_length, attn_sink):
    return jax_etap.mla_decode_sparse(q, kv_cache, indices, topk_length=topk_length, attn_sink=attn_sink)


# (h_q, specs of q, kv_cache, indices, topk_length, attn_sink). The cache and the indices
# are replicated or split over the batch; the sink is split like q's heads.
LAYOUTS = [
    pytest.param(8, (P(None, None, MODEL), P(), P(), P(), P(MODEL)), id="heads"),
    pytest.param(8, (P(DATA, None, MODEL), P(), P(DATA), P(DATA), P(MODEL)), id="batch-heads"),
    pytest.param(16, (P(None, None, BOTH), P(), P(), P(), P(BOTH)), id="heads-8-way"),
]


@pytest.fixture(params=["reference", "kernels-path"])
def decode(request, monkeypatch):
    """_decode, as a function of its own for the kernels' path: jit's cache of the
    reference's trace must not answer for it."""
    if request.param == "reference":
        return _decode
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    return lambda *args: _decode(*args)


@pytest.mark.parametrize("h_q,specs", LAYOUTS)
def test_sharded_equals_unsharded_without_communication(rng, mesh, h_q, specs, decode):
    case = _case(rng, h_q)
    args = (*case.args, case.topk_length, case.attn_sink)
    unsharded = jax.jit(decode)(*args)
    # Under Explicit axes the kernels' path is not taken yet, and says so.
    explicit_kernels_path = decode is not _decode and mesh.axis_types[0] == jax.sharding.AxisType.Explicit
    with pytest.warns(RuntimeWarning, match="Explicit mesh axes") if explicit_kernels_path else nullcontext():
        sharded, hlo = _compile(mesh, decode, _place(mesh, args, specs))
    assert _collectives(hlo) == [], "splitting heads or batch communicates"
    _check_result_layout(mesh, sharded, specs[0])
    if explicit_kernels_path:  # the sharded call ran the reference, the unsharded one the kernels' path
        assert_matches_sparse_oracle(*sharded, case, strict=False)
    else:
        assert_same_result(sharded, unsharded)


@pytest.mark.parametrize("implementation", ["cuda", "portable"])
def test_kernels_path_refuses_explicit_axes(rng, implementation):
    mesh = jax.make_mesh((2, 4), (DATA, MODEL), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    case = _case(rng, 8)
    args = _place(mesh, (*case.args, case.topk_length, case.attn_sink), LAYOUTS[1].values[1])
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match="does not run under Explicit mesh axes"):
        jax.jit(lambda q, kv, i, t, s: jax_etap.mla_decode_sparse(q, kv, i, topk_length=t, attn_sink=s,
                                                                  implementation=implementation))(*args)


def test_cache_split_along_tokens_is_partitioned_by_xla(rng, mesh):
    """Any layout is accepted: with the cache split along its tokens XLA communicates
    (which shows the check above can fail) and the result is still the unsharded one."""
    case = _case(rng, 8)
    args = (*case.args, case.topk_length, case.attn_sink)
    specs = (P(DATA, None, MODEL), P(MODEL), P(DATA), P(DATA), P(MODEL))
    sharded, hlo = _compile(mesh, _decode, _place(mesh, args, specs))
    assert _collectives(hlo) != []
    _check_result_layout(mesh, sharded, specs[0])
    assert_same_result(sharded, jax.jit(_decode)(*args))
