"""mla_decode against the float64 oracle: the reference (CPU and GPU) and the kernel (GPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
from cases import as_numpy, assert_matches_oracle, decode, make_problem
from oracle import mla_decode_oracle

GRID = [
    # (id, make_problem kwargs, mla_decode kwargs)
    ("mla16", dict(batch=3, lens=(1, 100, 1000)), dict()),
    ("mla16-causal-sq2", dict(batch=2, s_q=2, lens=(65, 700)), dict(causal=True)),
    ("mla16-causal-sq4-empty", dict(batch=3, s_q=4, lens=(0, 2, 333)), dict(causal=True)),
    ("noncausal-sq3", dict(batch=2, s_q=3, h_q=4, lens=(64, 129)), dict()),
    ("h1", dict(batch=2, h_q=1, lens=(63, 64)), dict(causal=True)),
    ("h3-fp16-bs16", dict(batch=4, s_q=2, h_q=3, block_size=16, lens=(5, 16, 17, 300), dtype=jnp.float16), dict(causal=True)),
    ("gqa-d128", dict(batch=2, h_q=8, h_kv=2, d_qk=128, head_dim_v=64, block_size=256, lens=(1000, 300)), dict()),
    ("d64-dv64", dict(batch=2, s_q=3, h_q=4, h_kv=2, d_qk=64, head_dim_v=64, lens=(1, 700)), dict(causal=True)),
    ("dv-odd", dict(batch=1, h_q=2, d_qk=192, head_dim_v=131, lens=(250,)), dict()),
    ("dv-equals-d", dict(batch=1, h_q=16, d_qk=576, head_dim_v=576, lens=(200,)), dict()),
    ("h32-scale", dict(batch=2, h_q=32, lens=(500, 90)), dict(softmax_scale=0.3)),
    ("dense", dict(batch=2, s_q=2, h_q=16, paged=False, lens=(37, 200)), dict(causal=True)),
]


@pytest.mark.parametrize("make_kwargs,call_kwargs", [g[1:] for g in GRID], ids=[g[0] for g in GRID])
def test_matches_float64_oracle(implementation, make_kwargs, call_kwargs):
    problem = make_problem(hash(str(make_kwargs)) % 2**31, **make_kwargs)
    out, lse = decode(problem, implementation, **call_kwargs)
    expected = mla_decode_oracle(*as_numpy(problem), head_dim_v=problem.head_dim_v, **call_kwargs)
    assert out.dtype == problem.q.dtype and lse.dtype == jnp.float32
    assert_matches_oracle(out, lse, *expected, make_kwargs.get("dtype", jnp.bfloat16))


def test_paged_equals_dense(implementation):
    paged = make_problem(1, batch=3, s_q=2, h_q=16, lens=(130, 64, 7))
    table = np.asarray(paged.block_table)
    dense_kv = np.asarray(paged.kv_cache)[table].reshape(3, -1, 1, 576)
    out_p, lse_p = decode(paged, implementation, causal=True)
    dense = make_problem(1, batch=3, s_q=2, h_q=16, lens=(130, 64, 7), paged=False)
    dense.q, dense.kv_cache = paged.q, jnp.asarray(dense_kv)
    out_d, lse_d = decode(dense, implementation, causal=True)
    np.testing.assert_array_equal(np.asarray(out_p, np.float32), np.asarray(out_d, np.float32))
    np.testing.assert_allclose(np.asarray(lse_p), np.asarray(lse_d), rtol=1e-6)


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_values_past_seqlen_never_reach_the_output(implementation, paged, poison):
    problem = make_problem(2, batch=3, s_q=2, h_q=16, lens=(1, 70, 129), paged=paged, fill_past_end=poison)
    out, lse = decode(problem, implementation, causal=True)
    expected = mla_decode_oracle(*as_numpy(make_problem(2, batch=3, s_q=2, h_q=16, lens=(1, 70, 129), paged=paged)),
                                 head_dim_v=512, causal=True)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_matches_oracle(out, lse, *expected, jnp.bfloat16)


def test_seqlens_are_clamped(implementation):
    problem = make_problem(3, batch=3, lens=(-5, 10**6, 50), capacity=200)
    out, lse = decode(problem, implementation)
    q, kv, _, table = as_numpy(problem)
    capacity = table.shape[1] * kv.shape[1]
    expected = mla_decode_oracle(q, kv, np.array([0, capacity, 50]), table, head_dim_v=512)
    assert_matches_oracle(out, lse, *expected, jnp.bfloat16)
    assert np.isneginf(np.asarray(lse)[0]).all() and (np.asarray(out, np.float32)[0] == 0).all()


def test_bad_block_table_entries(implementation):
    problem = make_problem(4, batch=3, lens=(200, 200, 64))
    table = np.asarray(problem.block_table).copy()
    num_blocks = problem.kv_cache.shape[0]
    table[0, 1] = num_blocks          # used block out of range: sequence 0 is all NaN
    table[1, 2] = -7                  # used block negative: sequence 1 is all NaN
    table[2, 1:] = [10**9, -1, 5][: table.shape[1] - 1]  # past sequence 2's single block: ignored
    problem.block_table = jnp.asarray(table)
    out, lse = decode(problem, implementation)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.isnan(out[:2]).all() and np.isnan(lse[:2]).all()
    expected = mla_decode_oracle(*as_numpy(problem), head_dim_v=512)
    assert_matches_oracle(out[2:], lse[2:], expected[0][2:], expected[1][2:], jnp.bfloat16)


def test_nan_in_q_propagates(implementation):
    problem = make_problem(5, batch=2, lens=(1, 300))
    problem.q = problem.q.at[:, 0, 3].set(jnp.nan)
    out, lse = decode(problem, implementation)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.isnan(out[:, 0, 3]).all() and np.isnan(lse[:, 3]).all()
    assert np.isfinite(np.delete(out, 3, axis=2)).all()


def test_long_sequence_uses_many_splits(implementation):
    if implementation == "xla":
        pytest.skip("the reference has no splits; its long-sequence numerics are covered on the GPU")
    problem = make_problem(6, batch=1, h_q=16, lens=(70001,))
    out, lse = decode(problem, implementation, causal=True)
    expected = mla_decode_oracle(*as_numpy(problem), head_dim_v=512, causal=True)
    assert_matches_oracle(out, lse, *expected, jnp.bfloat16)


@pytest.mark.parametrize("h_q", [64, 128])
def test_many_heads(implementation, h_q):
    problem = make_problem(7 + h_q, batch=2, s_q=2, h_q=h_q, lens=(1500, 77))
    out, lse = decode(problem, implementation, causal=True)
    expected = mla_decode_oracle(*as_numpy(problem), head_dim_v=512, causal=True)
    assert_matches_oracle(out, lse, *expected, jnp.bfloat16)
