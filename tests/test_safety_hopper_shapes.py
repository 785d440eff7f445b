"""Runtime safety at d_qk 576 / head_dim_v 512 with 16, 32, 64 and 128 query rows: the
shapes of the ETAP kernel (up to 32 rows) and the wide kernel (more), which the d64/d128
cases of test_safety.py never reach. Bad used block ids, clamped seqlens, junk entries past
the used blocks and NaN/inf past each sequence's end, in bfloat16 and float16, for every
implementation that runs here (conftest: the reference on CPU, the kernels on a GPU).
Small lengths keep the CPU time low. Verified: a reference that ignores the bad-block
mark (sequence_has_bad_block forced False) fails test_bad_used_block_is_nan.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import assert_matches_oracle, decode, make_case, to_f32

INT32_MAX = np.iinfo(np.int32).max
ROWS = [pytest.param((1, 16), id="rows16"), pytest.param((2, 16), id="rows32"),
        pytest.param((4, 16), id="rows64"), pytest.param((1, 128), id="rows128")]
DTYPES = [pytest.param(jnp.bfloat16, id="bf16"), pytest.param(jnp.float16, id="fp16")]


def _case(rng, rows, dtype, **kw):
    s_q, h_q = rows
    spec = dict(seqlens=(0, 1, 64, 130), capacity=192, s_q=s_q, h_q=h_q, causal=s_q > 1, dtype=dtype, block_size=64)
    spec.update(kw)
    return make_case(rng, **spec)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_poison_past_seqlen(rng, implementation, rows, dtype, poison):
    case = _case(rng, rows, dtype, poison=poison)
    out, lse = decode(case, implementation)
    assert_matches_oracle(out, lse, case)
    assert np.isfinite(to_f32(out)).all() and not np.isnan(np.asarray(lse)).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_bad_used_block_is_nan(rng, implementation, rows, dtype):
    case = _case(rng, rows, dtype)
    table = np.asarray(case.block_table).copy()
    table[3, 2] = -1  # sequence 3 (130 tokens) uses 3 blocks: its last is bad
    table[2, 1:] = INT32_MAX  # sequence 2 (64 tokens) uses block 0 only: junk ignored
    table[0, :] = case.kv_cache.shape[0]  # sequence 0 uses no block
    case = case.replace(block_table=jnp.asarray(table, jnp.int32))
    out, lse = decode(case, implementation)
    assert np.isnan(to_f32(out)[3]).all() and np.isnan(np.asarray(lse)[3]).all()
    assert np.isfinite(to_f32(out)[:3]).all()
    assert_matches_oracle(out, lse, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_seqlens_are_clamped(rng, implementation, rows, dtype):
    seqlens = (-7, 10**6, INT32_MAX, 100)
    case = _case(rng, rows, dtype, seqlens=seqlens, poison=np.nan)
    clamped = np.clip(np.asarray(seqlens, np.int64), 0, case.capacity)
    out, lse = decode(case, implementation)
    assert_matches_oracle(out, lse, case, cache_seqlens=clamped)
    exact = decode(case.replace(cache_seqlens=jnp.asarray(clamped, jnp.int32)), implementation)
    np.testing.assert_array_equal(to_f32(exact[0]), to_f32(out))
    np.testing.assert_array_equal(np.asarray(exact[1]), np.asarray(lse))
