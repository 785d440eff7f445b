"""mla_decode_sparse against the float64 NumPy oracle (tests/numpy_sparse_reference.py),
its conventions one by one, its errors, and jit, vmap, export and sharding.

Each convention's test was seen to fail on a reference broken on purpose: duplicates
removed (test_repeated_index_counts_twice and the oracle grid), the sink dropped
(test_sink_*), topk_length used one entry too many (test_topk_length_*).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_devices import run_on_8_host_devices
from mla_cases import assert_same_result, decode, make_case, to_f32
from sparse_cases import FP16, INF, ORACLE_CASES, assert_matches_sparse_oracle, decode_sparse, largest_traced_bytes, make_sparse_case, with_unselected_tokens_nan

import jax_etap




@pytest.mark.parametrize("params", ORACLE_CASES)
def test_matches_oracle(rng, params):
    case = make_sparse_case(rng, **params)
    assert_matches_sparse_oracle(*decode_sparse(case), case)


def _rows(case, rows):
    """The case with indices[b, i] replaced by the given lists (padded with -1)."""
    indices = np.asarray(case.indices).copy()
    for (b, i), row in rows.items():
        indices[b, i] = -1
        indices[b, i, : len(row)] = row
    return case.replace(indices=jnp.asarray(indices))


def test_repeated_index_counts_twice(rng):
    case = make_sparse_case(rng, batch=1, s_q=2, h_q=4, topk=4, num_blocks=2, block_size=8)
    twice = _rows(case, {(0, 0): [3, 3, 9], (0, 1): [3, 9]})
    out, lse = decode_sparse(twice)
    assert_matches_sparse_oracle(out, lse, twice)
    # The two rows (same q) differ only in token 3's count, and that must show.
    twice = twice.replace(q=jnp.broadcast_to(twice.q[:, :1], twice.q.shape))
    out, lse = decode_sparse(twice)
    assert np.abs(to_f32(out[0, 0]) - to_f32(out[0, 1])).max() > 0.05
    assert np.abs(np.asarray(lse[0, :, 0] - lse[0, :, 1])).min() > 0.1


def test_skipped_entries_read_nothing(rng):
    """-1 entries select nothing: with every token no row selects set to NaN (token 0,
    which a gather might read in their place, included) the outputs stay finite."""
    case = make_sparse_case(rng, batch=2, s_q=2, h_q=8, topk=16, num_blocks=4, block_size=16)
    indices = np.asarray(case.indices).copy()
    indices[..., ::2] = -1
    indices[indices == 0] = 5
    case = with_unselected_tokens_nan(case, indices)
    out, lse = decode_sparse(case)
    assert np.isfinite(to_f32(out)).all() and np.isfinite(np.asarray(lse)).all()
    assert_matches_sparse_oracle(out, lse, case)


@pytest.mark.parametrize("bad", [-2, 128, 2**31 - 1], ids=["minus2", "num_tokens", "int32max"])
def test_out_of_range_index_makes_only_its_row_nan(rng, bad):
    case = make_sparse_case(rng, batch=2, s_q=3, h_q=4, topk=8, num_blocks=2, block_size=64, skipped=0.2)
    indices = np.asarray(case.indices).copy()
    indices[1, 2, 5] = bad
    broken = case.replace(indices=jnp.asarray(indices))
    out, lse = decode_sparse(broken)
    assert np.isnan(to_f32(out[1, 2])).all() and np.isnan(np.asarray(lse[1, :, 2])).all()
    assert_matches_sparse_oracle(out, lse, broken)
    # Every other row is what it is without the bad entry, bit for bit.
    clean_out, clean_lse = decode_sparse(case)
    keep = np.ones((2, 3), bool)
    keep[1, 2] = False
    np.testing.assert_array_equal(to_f32(out)[keep], to_f32(clean_out)[keep])
    np.testing.assert_array_equal(np.asarray(lse).transpose(0, 2, 1)[keep], np.asarray(clean_lse).transpose(0, 2, 1)[keep])


def test_out_of_range_index_past_topk_length_is_ignored(rng):
    case = make_sparse_case(rng, batch=2, s_q=2, h_q=4, topk=8, num_blocks=2, block_size=16, topk_length=(5, 8))
    indices = np.asarray(case.indices).copy()
    indices[0, :, 5:] = 10**6
    out, lse = decode_sparse(case.replace(indices=jnp.asarray(indices)))
    assert not np.isnan(to_f32(out)).any()
    assert_same_result((out, lse), decode_sparse(case), rel=0, lse_tol=0)


def test_topk_length_clamps_and_cuts(rng):
    """topk_length 0 or negative: no token (out 0, lse -inf); past topk: all of them."""
    topk = 12
    case = make_sparse_case(rng, batch=5, s_q=2, h_q=4, topk=topk, num_blocks=2, block_size=16, topk_length=(0, -7, 5, topk + 30, 1))
    out, lse = decode_sparse(case)
    assert_matches_sparse_oracle(out, lse, case)
    assert (to_f32(out[:2]) == 0).all() and np.isneginf(np.asarray(lse[:2])).all()
    full = decode_sparse(case.replace(topk_length=None))
    assert_same_result((out[3:4], lse[3:4]), (full[0][3:4], full[1][3:4]), rel=0, lse_tol=0)
    # The cut is at exactly topk_length entries: the entry just past it is not used.
    indices = np.asarray(case.indices).copy()
    indices[2, :, 5:] = -1
    assert_same_result(
        (out[2:3], lse[2:3]), tuple(x[2:3] for x in decode_sparse(case.replace(indices=jnp.asarray(indices), topk_length=None))),
        rel=0, lse_tol=0,
    )


def test_sink_plus_inf_gives_zero_and_keeps_lse(rng):
    case = make_sparse_case(rng, h_q=4, s_q=2, topk=16)
    plain_out, plain_lse = decode_sparse(case)
    out, lse = decode_sparse(case.replace(attn_sink=jnp.full((4,), jnp.inf, jnp.float32)))
    assert (to_f32(out) == 0).all()
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))
    assert np.abs(to_f32(plain_out)).max() > 0


def test_sink_minus_inf_changes_nothing(rng):
    case = make_sparse_case(rng, h_q=4, s_q=2, topk=16, topk_length=(16, 0))
    sunk = decode_sparse(case.replace(attn_sink=jnp.full((4,), -jnp.inf, jnp.float32)))
    assert_same_result(sunk, decode_sparse(case), rel=0, lse_tol=0)
    assert (to_f32(sunk[0][1]) == 0).all() and np.isneginf(np.asarray(sunk[1][1])).all()  # no token, no NaN


def test_sink_finite_scales_out_by_the_formula(rng):
    case = make_sparse_case(rng, h_q=4, s_q=2, topk=16, attn_sink=(0.0, 3.0, -1.0, 8.0), topk_length=(16, 0))
    out, lse = decode_sparse(case)
    assert_matches_sparse_oracle(out, lse, case)
    plain_out, _ = decode_sparse(case.replace(attn_sink=None))
    ratio = to_f32(out[0]) / to_f32(plain_out[0])  # [s_q, h_q, dv]
    expected = 1 / (1 + np.exp(np.asarray(case.attn_sink)[None, :] - np.asarray(lse[0]).T))  # [s_q, h_q]
    np.testing.assert_allclose(np.median(ratio, axis=-1), expected, rtol=1e-2)


def test_equals_mla_decode_on_all_tokens_of_each_sequence(rng):
    """Selecting every token 0..L-1 of a sequence (their positions read through its block
    table) is non-causal dense decode over that sequence."""
    dense = make_case(rng, seqlens=(0, 1, 77, 300), s_q=2, h_q=16, block_size=16, spare_blocks=3)
    table = np.asarray(dense.block_table)
    capacity = table.shape[1] * 16
    t = np.arange(capacity)
    positions = table[:, t // 16] * 16 + t % 16  # [batch, capacity]
    seqlens = np.asarray(dense.cache_seqlens)
    # Sequences 0 and 1 end with -1 entries, 2 and 3 are cut by topk_length.
    positions[:2] = np.where(t[None, :] < seqlens[:2, None], positions[:2], -1)
    indices = jnp.asarray(np.broadcast_to(positions[:, None, :], (4, 2, capacity)), jnp.int32)
    topk_length = jnp.asarray([capacity, capacity, 77, 300], jnp.int32)
    sparse = jax_etap.mla_decode_sparse(dense.q, dense.kv_cache, indices, topk_length=topk_length)
    assert_same_result(sparse, decode(dense, causal=False))


def test_jit_equals_eager(rng):
    case = make_sparse_case(rng, h_q=4, s_q=2, topk=16, skipped=0.2, topk_length=(9, 16), attn_sink=(0.5, -1, INF, 2))
    assert_same_result(decode_sparse(case, jit=False), decode_sparse(case), rel=0, lse_tol=0)


@pytest.mark.parametrize("map_cache", [False, True], ids=["shared-cache", "mapped-cache"])
def test_vmap_equals_a_loop(rng, map_cache):
    cases = [make_sparse_case(rng, h_q=4, s_q=2, topk=24, num_blocks=4, block_size=16, skipped=0.2, topk_length=(24, 7)) for _ in range(3)]
    kv = jnp.stack([c.kv_cache for c in cases]) if map_cache else cases[0].kv_cache
    stack = lambda name: jnp.stack([getattr(c, name) for c in cases])  # noqa: E731

    def f(q, kv_cache, indices, topk_length):
        return jax_etap.mla_decode_sparse(q, kv_cache, indices, topk_length=topk_length)

    got = jax.jit(jax.vmap(f, in_axes=(0, 0 if map_cache else None, 0, 0)))(stack("q"), kv, stack("indices"), stack("topk_length"))
    for v, c in enumerate(cases):
        expected = decode_sparse(c if map_cache else c.replace(kv_cache=kv))
        assert_same_result((got[0][v], got[1][v]), expected)


def test_export_round_trip(rng):
    case = make_sparse_case(rng, h_q=4, s_q=2, topk=16, skipped=0.2, topk_length=(9, 16), attn_sink=(0.5, -1, INF, 2))

    def f(q, kv_cache, indices, topk_length, attn_sink):
        return jax_etap.mla_decode_sparse(q, kv_cache, indices, topk_length=topk_length, attn_sink=attn_sink, softmax_scale=0.1)

    args = (*case.args, case.topk_length, case.attn_sink)
    restored = jax.export.deserialize(jax.export.export(jax.jit(f))(*args).serialize())
    assert_same_result(restored.call(*args), jax.jit(f)(*args), rel=0, lse_tol=0)


def test_reference_gathers_only_the_selected_rows(rng):
    """No value in the traced computation is larger (in bytes) than the cache (its flat
    view is as large): a reference that laid the cache out per query (batch * s_q copies) would make
    one 6x larger."""
    case = make_sparse_case(rng, batch=2, s_q=3, h_q=4, topk=8, num_blocks=64, block_size=64, d_qk=64, head_dim_v=64)
    largest = largest_traced_bytes(lambda *a: jax_etap.mla_decode_sparse(*a, head_dim_v=64), *case.args)
    assert largest <= case.kv_cache.nbytes
    assert largest >= 2 * 3 * 8 * 64 * 2  # the gathered rows are in it


ERRORS = [
    (dict(q=jnp.zeros((2, 1, 4, 576), jnp.float32)), TypeError, r"q must be bfloat16 or float16, got shape \(2, 1, 4, 576\) and dtype float32"),
    (dict(q=jnp.zeros((2, 4, 576), jnp.bfloat16)), ValueError, r"q must have rank 4 \(\[batch, s_q, h_q, d_qk\]\)"),
    (dict(kv_cache=jnp.zeros((8, 64, 1, 576), jnp.float16)), TypeError, r"kv_cache must have q's dtype bfloat16, got .*float16"),
    (dict(kv_cache=jnp.zeros((8, 64, 2, 576), jnp.bfloat16)), ValueError, r"kv_cache must have one KV head .*shape \(8, 64, 2, 576\)"),
    (dict(kv_cache=jnp.zeros((8, 64, 1, 512), jnp.bfloat16)), ValueError, r"kv_cache's last dimension must equal q's d_qk = 576"),
    (dict(indices=jnp.zeros((2, 1, 16), jnp.uint32)), TypeError, r"indices must be int32"),
    (dict(indices=jnp.zeros((2, 16), jnp.int32)), ValueError, r"indices must have rank 3 \(\[batch, s_q, topk\]\)"),
    (dict(indices=jnp.zeros((2, 2, 16), jnp.int32)), ValueError, r"indices must have shape \(2, 1, topk\) to match q's batch and s_q, got shape \(2, 2, 16\)"),
    (dict(topk_length=jnp.zeros((3,), jnp.int32)), ValueError, r"topk_length must have shape \(2,\) to match q's batch, got shape \(3,\)"),
    (dict(topk_length=jnp.zeros((2,), jnp.float32)), TypeError, r"topk_length must be int32, got shape \(2,\) and dtype float32"),
    (dict(attn_sink=jnp.zeros((4,), jnp.bfloat16)), TypeError, r"attn_sink must be float32, got shape \(4,\) and dtype bfloat16"),
    (dict(attn_sink=jnp.zeros((8,), jnp.float32)), ValueError, r"attn_sink must have shape \(4,\) to match q's h_q, got shape \(8,\)"),
    (dict(attn_sink=jnp.zeros((1, 4), jnp.float32)), ValueError, r"attn_sink must have rank 1 \(\[h_q\]\)"),
    (dict(head_dim_v=577), ValueError, r"head_dim_v must be in \[1, d_qk = 576\], got 577"),
    (dict(softmax_scale=-1.0), ValueError, r"softmax_scale must be a positive finite number, got -1.0"),
    (dict(implementation="triton"), ValueError, r"implementation must be one of None, 'xla', 'cuda', 'etap', 'portable'; got 'triton'"),
]


@pytest.mark.parametrize("change,error,match", ERRORS, ids=[f"{k}-{i}" for i, (c, _, _) in enumerate(ERRORS) for k in c])
def test_errors_at_trace_time_name_the_argument(change, error, match):
    args = dict(
        q=jnp.zeros((2, 1, 4, 576), jnp.bfloat16), kv_cache=jnp.zeros((8, 64, 1, 576), jnp.bfloat16),
        indices=jnp.zeros((2, 1, 16), jnp.int32),
    )
    args.update(change)
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) if hasattr(v, "shape") else v for k, v in args.items()}
    arrays = {k: v for k, v in specs.items() if isinstance(v, jax.ShapeDtypeStruct)}
    static = {k: v for k, v in specs.items() if k not in arrays}
    with pytest.raises(error, match=match):
        jax.eval_shape(lambda a: jax_etap.mla_decode_sparse(**a, **static), arrays)


def test_default_takes_the_kernels_path_on_a_gpu_and_the_reference_elsewhere(rng, monkeypatch):
    """None: the reference on a CPU; where jax's default backend is a GPU, the path through
    mla_decode's kernels (jax_etap._sparse_gathered), as "cuda" and "portable" always."""
    import jax_etap.sparse as sparse

    case = make_sparse_case(rng, h_q=2, topk=4, num_blocks=1)
    taken = []
    monkeypatch.setattr(sparse, "gathered_decode", lambda *args: taken.append(args[-1]) or (None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_sparse(case, jit=False)
        decode_sparse(case, "xla", jit=False)
        assert taken == []
        decode_sparse(case, "portable", jit=False)
        decode_sparse(case, "etap", jit=False)
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        decode_sparse(case, "xla", jit=False)
        decode_sparse(case, jit=False)
    assert taken == ["portable", "etap", None]


CHECKS = Path(__file__).with_name("sparse_sharded_checks.py")
SHARDED_CHECKS = 16  # the tests sparse_sharded_checks.py collects


def test_sharded_checks_on_8_host_devices():
    """tests/sparse_sharded_checks.py, run by pytest in a process with 8 CPU host devices."""
    proc, summary, report = run_on_8_host_devices(CHECKS)
    assert proc.returncode == 0, report
    assert re.fullmatch(rf"{SHARDED_CHECKS} passed in .*", summary), report
