"""jit, vmap and export (on the default backend), and the CUDA lowering inspected without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import make_problem

import jax_etap


def _call(q, kv, s, t, **kw):
    return jax_etap.mla_decode(q, kv, s, t, causal=True, **kw)


def _stack(problems):
    return [jnp.stack(x) for x in zip(*[(p.q, p.kv_cache, p.seqlens, p.block_table) for p in problems])]


def _loop(problems, shared_kv=None):
    outs = [_call(p.q, p.kv_cache if shared_kv is None else shared_kv, p.seqlens, p.block_table) for p in problems]
    return jnp.stack([o for o, _ in outs]), jnp.stack([l for _, l in outs])


def _assert_same(a, b):
    """Equal up to float32 reassociation (XLA fuses differently per batch size): an
    indexing mistake under vmap gives errors of order 1, far above these bounds."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    out_a, out_b = np.asarray(out_a, np.float32), np.asarray(out_b, np.float32)
    assert np.linalg.norm(out_a - out_b) <= 1e-3 * np.linalg.norm(out_b)
    np.testing.assert_allclose(np.asarray(lse_a), np.asarray(lse_b), rtol=1e-5, atol=1e-5)


def test_jit_equals_eager():
    p = make_problem(0, batch=2, s_q=2, lens=(50, 300))
    _assert_same(_call(p.q, p.kv_cache, p.seqlens, p.block_table), jax.jit(_call)(p.q, p.kv_cache, p.seqlens, p.block_table))


def test_vmap_over_every_argument():
    problems = [make_problem(i, batch=2, s_q=2, h_q=4, lens=(40 + i, 130)) for i in range(3)]
    q, kv, s, t = _stack(problems)
    # Mapped caches are concatenated into one pool: every call's table must land in its own pool.
    _assert_same(jax.jit(jax.vmap(_call))(q, kv, s, t), _loop(problems))


def test_vmap_with_a_shared_pool_and_other_axes():
    problems = [make_problem(7, batch=2, s_q=2, h_q=4, lens=(40, 130)) for _ in range(3)]
    shared = problems[0].kv_cache
    for i, p in enumerate(problems):
        p.q = p.q + i
        p.seqlens = p.seqlens - 10 * i
    q, _, s, t = _stack(problems)
    fn = jax.vmap(_call, in_axes=(1, None, 0, 0))
    _assert_same(jax.jit(fn)(jnp.moveaxis(q, 0, 1), shared, s, t), _loop(problems, shared_kv=shared))


def test_vmap_over_q_only():
    p = make_problem(3, batch=2, h_q=4, lens=(64, 65))
    qs = jnp.stack([p.q, p.q * 2, -p.q])
    out, lse = jax.vmap(_call, in_axes=(0, None, None, None))(qs, p.kv_cache, p.seqlens, p.block_table)
    for i in range(3):
        _assert_same((out[i], lse[i]), _call(qs[i], p.kv_cache, p.seqlens, p.block_table))


def test_vmap_of_dense_caches():
    problems = [make_problem(i, batch=2, h_q=4, lens=(10, 100), paged=False) for i in range(2)]
    q, kv, s = (jnp.stack(x) for x in zip(*[(p.q, p.kv_cache, p.seqlens) for p in problems]))
    fn = jax.vmap(lambda q, kv, s: _call(q, kv, s, None))
    expected = [_call(p.q, p.kv_cache, p.seqlens, None) for p in problems]
    _assert_same(fn(q, kv, s), (jnp.stack([e[0] for e in expected]), jnp.stack([e[1] for e in expected])))


def test_export_round_trip():
    p = make_problem(4, batch=2, s_q=2, lens=(50, 300))
    args = (p.q, p.kv_cache, p.seqlens, p.block_table)
    # On a GPU the module holds the kernel's custom call, which jax.export accepts only
    # when told that the target's compatibility is the caller's business.
    unchecked = [jax.export.DisabledSafetyCheck.custom_call("jax_etap_mla_decode_v1")]
    exported = jax.export.export(jax.jit(_call), disabled_checks=unchecked)(*args)
    restored = jax.export.deserialize(exported.serialize())
    _assert_same(restored.call(*args), _call(*args))


def _lowered_text(platform, implementation=None):
    p = make_problem(5, batch=2, s_q=2, lens=(50, 300))
    fn = jax.jit(lambda *a: _call(*a, implementation=implementation))
    return fn.trace(p.q, p.kv_cache, p.seqlens, p.block_table).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.skipif(not jax_etap.build_info()["cuda"], reason="extension built without CUDA")
def test_cuda_lowering_calls_the_kernel_not_the_reference():
    cpu, cuda = _lowered_text("cpu"), _lowered_text("cuda")
    # The reference's softmax exponentiates; the kernel call does not appear in it.
    assert "stablehlo.exponential" in cpu and "jax_etap_mla_decode_v1" not in cpu
    assert "stablehlo.custom_call @jax_etap_mla_decode_v1" in cuda
    assert "stablehlo.exponential" not in cuda
    assert "causal = true" in cuda


@pytest.mark.skipif(not jax_etap.build_info()["cuda"], reason="extension built without CUDA")
def test_xla_implementation_lowers_to_the_reference_on_cuda():
    cuda = _lowered_text("cuda", implementation="xla")
    assert "jax_etap_mla_decode_v1" not in cuda and "stablehlo.exponential" in cuda


@pytest.mark.skipif(not jax_etap.kernel_available(), reason="needs a CUDA GPU and the CUDA build")
def test_default_backend_runs_the_kernel():
    p = make_problem(6, batch=1, lens=(10,))
    assert "jax_etap_mla_decode_v1" in jax.jit(_call).lower(p.q, p.kv_cache, p.seqlens, p.block_table).as_text()
