"""jit, vmap and export of mla_decode, each against unbatched / direct calls.

Runs on the default backend with implementation=None (the CPU reference through the
primitive, or the CUDA kernel on a GPU) and with implementation="xla". vmap results are
compared with a Python loop of unbatched calls (and the loop with the float64 oracle), at
the 'same computation' tolerance of mla_cases.assert_same_result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import assert_matches_oracle, assert_same_result, make_case

import jax_etap

IMPLS = [pytest.param(None, id="default"), pytest.param("xla", id="xla")]


def _fn(implementation, **kwargs):
    kwargs.setdefault("causal", True)
    kwargs.setdefault("head_dim_v", 64)

    def f(q, kv, s, t):
        return jax_etap.mla_decode(q, kv, s, t, implementation=implementation, **kwargs)

    return f


def _dense_fn(implementation, **kwargs):
    f = _fn(implementation, **kwargs)
    return lambda q, kv, s: f(q, kv, s, None)


def _stack(results):
    return jnp.stack([r[0] for r in results]), jnp.stack([r[1] for r in results])


def _assert_each_matches_oracle(stacked, cases):
    """Result i of a stacked (out, lse) against case i's float64 oracle."""
    for i, c in enumerate(cases):
        assert_matches_oracle(stacked[0][i], stacked[1][i], c)


def _stacked_args(cases):
    """(q, kv_cache, cache_seqlens, block_table) of the cases, each stacked on a new axis 0."""
    return tuple(jnp.stack(x) for x in zip(*[c.args for c in cases]))


def _jit_vmap_over(cases, implementation):
    """jit(vmap(mla_decode)) over the cases, every argument mapped, and the unmapped function."""
    f = _fn(implementation)
    return jax.jit(jax.vmap(f))(*_stacked_args(cases)), f


def _cases(rng, n, *, block_size=16, seqlens_list=None, **kw):
    spec = dict(s_q=2, h_q=4, d_qk=128, head_dim_v=64, causal=True, block_size=block_size)
    spec.update(kw)
    seqlens_list = seqlens_list or [(10 + 7 * i, 40 - 9 * i, 3 * i) for i in range(n)]
    return [make_case(rng, seqlens=seqlens_list[i], capacity=48, **spec) for i in range(n)]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("paged", [True, False])
def test_jit_equals_eager(rng, implementation, paged):
    case = make_case(rng, seqlens=(0, 50, 300), s_q=2, h_q=16, causal=True, block_size=64 if paged else None)
    f = _fn(implementation, head_dim_v=512)
    eager = f(*case.args)
    jitted = jax.jit(f)(*case.args)
    assert_same_result(jitted, eager)
    assert_matches_oracle(*jitted, case)


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_over_q_only(rng, implementation):
    case = _cases(rng, 1)[0]
    qs = jnp.asarray(rng.standard_normal((3, *case.q.shape)), case.dtype)
    f = _fn(implementation)
    got = jax.jit(jax.vmap(f, in_axes=(0, None, None, None)))(qs, *case.args[1:])
    loop = _stack([f(qs[i], *case.args[1:]) for i in range(3)])
    assert_same_result(got, loop)
    for i in range(3):
        assert_matches_oracle(got[0][i], got[1][i], case.replace(q=qs[i]))


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_over_q_seqlens_table_with_a_shared_pool(rng, implementation):
    cases = _cases(rng, 3, spare_blocks=4)
    pool = cases[0].kv_cache
    num_blocks = pool.shape[0]
    # Every mapped call indexes the one shared pool with its own table.
    tables = [jnp.asarray(rng.permutation(num_blocks)[: c.block_table.size].reshape(c.block_table.shape), jnp.int32) for c in cases]
    cases = [c.replace(kv_cache=pool, block_table=t) for c, t in zip(cases, tables)]
    q, s, t = (jnp.stack(x) for x in zip(*[(c.q, c.cache_seqlens, c.block_table) for c in cases]))
    f = _fn(implementation)
    got = jax.jit(jax.vmap(f, in_axes=(0, None, 0, 0)))(q, pool, s, t)
    loop = _stack([f(*c.args) for c in cases])
    assert_same_result(got, loop)
    _assert_each_matches_oracle(got, cases)


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_over_every_argument_paged(rng, implementation):
    """Each mapped call has its own pool: its table must index its own pool only."""
    cases = _cases(rng, 3)
    got, f = _jit_vmap_over(cases, implementation)
    loop = _stack([f(*c.args) for c in cases])
    assert_same_result(got, loop)
    _assert_each_matches_oracle(got, cases)


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_over_every_argument_dense(rng, implementation):
    cases = _cases(rng, 3, block_size=None)
    q, kv, s = (jnp.stack(x) for x in zip(*[c.args[:3] for c in cases]))
    f = _dense_fn(implementation)
    got = jax.jit(jax.vmap(f))(q, kv, s)
    loop = _stack([f(*c.args[:3]) for c in cases])
    assert_same_result(got, loop)
    _assert_each_matches_oracle(got, cases)


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_dense_over_kv_and_seqlens_only(rng, implementation):
    case = _cases(rng, 1, block_size=None)[0]
    kvs = jnp.asarray(rng.standard_normal((2, *case.kv_cache.shape)), case.dtype)
    seqlens = jnp.asarray([[5, 48, 0], [47, 1, 30]], jnp.int32)
    f = _dense_fn(implementation)
    got = jax.jit(jax.vmap(f, in_axes=(None, 0, 0)))(case.q, kvs, seqlens)
    loop = _stack([f(case.q, kvs[i], seqlens[i]) for i in range(2)])
    assert_same_result(got, loop)


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_with_nonzero_in_axes(rng, implementation):
    cases = _cases(rng, 3)
    q, kv, s, t = _stacked_args(cases)
    # q mapped along its h_q axis position (2 after insertion), the pool along axis 1,
    # seqlens along 0 and the table along its last axis.
    q_m, kv_m, t_m = jnp.moveaxis(q, 0, 2), jnp.moveaxis(kv, 0, 1), jnp.moveaxis(t, 0, 2)
    f = _fn(implementation)
    got = jax.jit(jax.vmap(f, in_axes=(2, 1, 0, 2)))(q_m, kv_m, s, t_m)
    loop = _stack([f(*c.args) for c in cases])
    assert_same_result(got, loop)
    # out_axes other than 0.
    got_t = jax.jit(jax.vmap(f, in_axes=(2, 1, 0, 2), out_axes=(1, 2)))(q_m, kv_m, s, t_m)
    assert_same_result((jnp.moveaxis(got_t[0], 1, 0), jnp.moveaxis(got_t[1], 2, 0)), loop)


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_over_the_pool_only(rng, implementation):
    """Same queries and tables against several pools (mapped kv_cache, nothing else)."""
    case = _cases(rng, 1)[0]
    pools = jnp.asarray(rng.standard_normal((3, *case.kv_cache.shape)), case.dtype)
    f = _fn(implementation)
    got = jax.jit(jax.vmap(f, in_axes=(None, 0, None, None)))(case.q, pools, *case.args[2:])
    loop = _stack([f(case.q, pools[i], *case.args[2:]) for i in range(3)])
    assert_same_result(got, loop)
    for i in range(3):
        assert_matches_oracle(got[0][i], got[1][i], case.replace(kv_cache=pools[i]))


@pytest.mark.parametrize("implementation", IMPLS)
def test_inside_scan(rng, implementation):
    """A decode loop: lax.scan over steps, each step its own queries and lengths."""
    case = _cases(rng, 1)[0]
    steps = 3
    qs = jnp.asarray(rng.standard_normal((steps, *case.q.shape)), case.dtype)
    lens = jnp.stack([case.cache_seqlens + i for i in range(steps)])
    f = _fn(implementation)

    def body(carry, x):
        q, s = x
        out, lse = f(q, case.kv_cache, s, case.block_table)
        return carry + lse.sum(), (out, lse)

    _, got = jax.jit(lambda qs, lens: jax.lax.scan(body, jnp.float32(0), (qs, lens)))(qs, lens)
    loop = _stack([f(qs[i], case.kv_cache, lens[i], case.block_table) for i in range(steps)])
    assert_same_result(got, loop)


@pytest.mark.parametrize("implementation", IMPLS)
def test_nested_vmap(rng, implementation):
    cases = _cases(rng, 4)
    q, kv, s, t = _stacked_args(cases)
    q, kv, s, t = (x.reshape(2, 2, *x.shape[1:]) for x in (q, kv, s, t))
    f = _fn(implementation)
    # Outer map over everything; inner map over q, seqlens and table with the pool shared.
    got = jax.jit(jax.vmap(jax.vmap(f, in_axes=(0, None, 0, 0)), in_axes=(0, 0, 0, 0)))(q, kv[:, 0], s, t)
    for i in range(2):
        for j in range(2):
            one = f(q[i, j], kv[i, 0], s[i, j], t[i, j])
            assert_same_result((got[0][i, j], got[1][i, j]), one)


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_keeps_bad_blocks_bad(rng, implementation):
    """A table entry out of range for its own pool must stay out of range once vmap
    concatenates the pools (it must not read a neighbour's pool)."""
    cases = _cases(rng, 3, seqlens_list=[(40, 40, 40)] * 3)
    num_blocks = cases[0].kv_cache.shape[0]
    tables = [np.asarray(c.block_table).copy() for c in cases]
    tables[0][0, 1] = num_blocks  # in range of the concatenated pool, not of its own
    tables[1][1, 0] = -1
    tables[2][2, 2] = 2 * num_blocks + 1
    cases = [c.replace(block_table=jnp.asarray(tb)) for c, tb in zip(cases, tables)]
    got, _ = _jit_vmap_over(cases, implementation)
    lse = np.asarray(got[1])
    expected_bad = np.zeros((3, 3), bool)
    expected_bad[0, 0] = expected_bad[1, 1] = expected_bad[2, 2] = True
    np.testing.assert_array_equal(np.isnan(lse).all(axis=(2, 3)), expected_bad)
    _assert_each_matches_oracle(got, cases)


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_of_jit_and_jit_of_vmap(rng, implementation):
    cases = _cases(rng, 2)
    q, kv, s, t = _stacked_args(cases)
    f = _fn(implementation)
    a = jax.vmap(jax.jit(f))(q, kv, s, t)
    b = jax.jit(jax.vmap(f))(q, kv, s, t)
    assert_same_result(a, b)


def _disabled_checks():
    """On a GPU the exported module holds the kernel's custom call, which jax.export
    accepts only when told the target's compatibility is the caller's business."""
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in jax_etap.build_info().get("ffi_targets", [])]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("paged", [True, False])
def test_export_round_trip(rng, implementation, paged):
    case = make_case(rng, seqlens=(0, 50, 300), s_q=2, h_q=16, causal=True, block_size=64 if paged else None)
    f = _fn(implementation, head_dim_v=512)
    args = case.args if paged else case.args[:3]
    g = f if paged else (lambda q, kv, s: f(q, kv, s, None))
    kwargs = dict(disabled_checks=_disabled_checks()) if jax_etap.kernel_available() else {}
    exp = jax.export.export(jax.jit(g), **kwargs)(*args)
    restored = jax.export.deserialize(exp.serialize())
    got = restored.call(*args)
    direct = jax.jit(g)(*args)
    assert_same_result(got, direct)
    assert_matches_oracle(*got, case)


@pytest.mark.skipif(not jax_etap.build_info()["cuda"], reason="extension built without CUDA: no cuda lowering to export")
def test_export_for_cpu_and_cuda_runs_here(rng):
    """One artifact lowered for both platforms (the kernel for cuda, the reference for
    cpu) deserializes and runs on the platform at hand."""
    case = make_case(rng, seqlens=(7, 90), s_q=2, h_q=16, causal=True)
    f = _fn(None, head_dim_v=512)
    exp = jax.export.export(jax.jit(f), platforms=("cpu", "cuda"), disabled_checks=_disabled_checks())(*case.args)
    assert set(exp.platforms) == {"cpu", "cuda"}
    got = jax.export.deserialize(exp.serialize()).call(*case.args)
    assert_same_result(got, jax.jit(f)(*case.args))
    assert_matches_oracle(*got, case)


@pytest.mark.parametrize("implementation", IMPLS)
def test_export_with_symbolic_batch(rng, implementation):
    """Shape-polymorphic export in the batch works and runs at a concrete batch.

    It used to turn any export failure into a skip; a failure now fails (verified: with
    cache_seqlens given the spec ``(b, 1)`` the export raises and the test fails)."""
    case = _cases(rng, 1)[0]
    f = _fn(implementation)
    (b,) = jax.export.symbolic_shape("b")
    specs = [jax.ShapeDtypeStruct((b, *case.q.shape[1:]), case.dtype),
             jax.ShapeDtypeStruct(case.kv_cache.shape, case.dtype),
             jax.ShapeDtypeStruct((b,), jnp.int32),
             jax.ShapeDtypeStruct((b, case.block_table.shape[1]), jnp.int32)]
    kwargs = dict(disabled_checks=_disabled_checks()) if jax_etap.kernel_available() else {}
    exp = jax.export.export(jax.jit(f), **kwargs)(*specs)
    got = exp.call(*case.args)
    assert_same_result(got, jax.jit(f)(*case.args))

