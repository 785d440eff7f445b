"""The jnp reference and ``mla_decode(implementation="xla" / None)`` against the float64 oracle.

Runs on any backend (on CPU, ``implementation=None`` is the reference through the
primitive's CPU lowering; on a CUDA GPU it is the kernel). Tolerances: see mla_cases.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import (
    ORACLE_GRID,
    assert_matches,
    assert_matches_oracle,
    assert_same_result,
    decode,
    decode_reference,
    make_case,
)

import jax_etap

def _check_all_entry_points(case):
    """The reference function, implementation="xla" and None, each against the oracle."""
    ref_out, ref_lse = case.oracle()
    results = {
        "reference": decode_reference(case),
        "xla": decode(case, "xla"),
        "default": decode(case, None),
    }
    for name, (out, lse) in results.items():
        try:
            assert_matches(out, lse, ref_out, ref_lse, case.dtype)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err
    return results


@pytest.mark.parametrize("spec", ORACLE_GRID)
def test_matches_float64_oracle(rng, spec):
    case = make_case(rng, **spec)
    _check_all_entry_points(case)


@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("causal,s_q", [(False, 1), (True, 2), (True, 4), (False, 3)])
def test_paged_with_permuted_blocks_equals_dense(rng, block_size, causal, s_q):
    """The same tokens laid out in shuffled blocks or densely give the same result."""
    seqlens = (1, 2 * block_size + 5, 0, block_size)
    paged = make_case(rng, seqlens=seqlens, s_q=s_q, h_q=3, d_qk=128, head_dim_v=64, block_size=block_size,
                      causal=causal, spare_blocks=3)
    table = np.asarray(paged.block_table)
    assert not np.array_equal(table.ravel(), np.sort(table.ravel())), "blocks should be shuffled"
    pool = np.asarray(paged.kv_cache.astype(jnp.float32))
    dense_kv = pool[table].reshape(len(seqlens), -1, *pool.shape[2:])  # [b, capacity, h_kv, d]
    dense = paged.replace(kv_cache=jnp.asarray(dense_kv, paged.dtype), block_table=None)
    for implementation in ("xla", None):
        got_paged = decode(paged, implementation)
        got_dense = decode(dense, implementation)
        assert_same_result(got_paged, got_dense)
        assert_matches_oracle(*got_dense, dense)
        assert_matches_oracle(*got_paged, paged)


def test_default_implementation_on_cpu_is_the_reference(rng):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice of implementation=None")
    assert jax_etap.kernel_available() is False
    case = make_case(rng, seqlens=(3, 77, 0), s_q=2, h_q=4, causal=True)
    assert_same_result(decode(case, None), decode(case, "xla"))
    # And no kernel custom call is compiled in for the CPU.
    text = jax.jit(lambda *a: jax_etap.mla_decode(*a, causal=True)).lower(*case.args).as_text()
    assert not re.search(r"custom_call\s*@\S*jax_etap_mla_decode", text)


def test_eager_call_matches_oracle(rng):
    case = make_case(rng, seqlens=(10, 129), s_q=2, h_q=16, causal=True, dtype=jnp.float16)
    for implementation in ("xla", None):
        out, lse = decode(case, implementation, jit=False)
        assert_matches_oracle(out, lse, case)
    out, lse = jax_etap.reference.mla_decode_reference(*case.args, **case.kwargs)
    assert_matches_oracle(out, lse, case)


def test_defaults(rng):
    """head_dim_v defaults to 512, softmax_scale to d_qk ** -0.5, causal to False, block_table to None."""
    case = make_case(rng, seqlens=(20, 45), s_q=2, h_q=4, block_size=None)
    out, lse = jax_etap.mla_decode(case.q, case.kv_cache, case.cache_seqlens)
    assert out.shape == (2, 2, 4, 512)
    assert_matches_oracle(out, lse, case)
    explicit = jax_etap.mla_decode(case.q, case.kv_cache, case.cache_seqlens, None, head_dim_v=512,
                                   softmax_scale=576**-0.5, causal=False)
    assert_same_result((out, lse), explicit)


def test_softmax_scale_is_applied(rng):
    """A different scale gives a different (and correct) result: the argument is not ignored."""
    case = make_case(rng, seqlens=(60, 100), h_q=4, d_qk=128, head_dim_v=128)
    a = decode(case, None, softmax_scale=0.5)
    b = decode(case, None)
    assert_matches_oracle(*a, case.replace(softmax_scale=0.5))
    assert_matches_oracle(*b, case)
    assert np.abs(np.asarray(a[1]) - np.asarray(b[1])).max() > 1.0


def test_public_attributes():
    assert isinstance(jax_etap.__version__, str) and jax_etap.__version__
    assert isinstance(jax_etap.kernel_available(), bool)
    info = jax_etap.build_info()
    assert isinstance(info, dict) and isinstance(info["cuda"], bool)
    if jax.default_backend() == "cpu":
        assert jax_etap.kernel_available() is False
    if not info["cuda"]:
        assert jax_etap.kernel_available() is False
