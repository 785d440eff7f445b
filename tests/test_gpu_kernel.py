"""The CUDA kernels against the float64 oracle and the reference.

implementation="etap" runs the best kernel for the GPU and shape (on Hopper the ETAP
kernel up to 32 query rows per KV head and the wide kernel above, wherever they apply:
d_qk 512/576, head_dim_v 512, block sizes that tile 64 keys; the portable kernel
elsewhere); implementation="portable" forces the portable sm_80 kernel. The main grids
run both; the rest runs "etap". Skipped as a whole unless ``jax_etap.kernel_available()``
(extension built with CUDA and a CUDA GPU as jax's default device). Each case checks the
kernel against the float64 oracle and against the jnp reference run on the same GPU
(implementation="xla"), with the tolerances of mla_cases: out relative error norm within
2x the bf16/fp16 rounding floor against the oracle (1e-2 / 2e-3 against the reference);
lse within 1e-5 * max(1, |lse|); NaN, -inf and exact zeros exactly where expected.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import ORACLE_GRID, assert_matches, decode, make_case, to_f32

import jax_etap

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not jax_etap.kernel_available(), reason="the CUDA kernel cannot run here (no CUDA GPU or no CUDA build)"),
]


@pytest.fixture(params=["etap", "portable"])
def kernel(request):
    return request.param


def check_kernel(case, implementation="etap", **oracle_overrides):
    """Kernel vs oracle, reference vs oracle, kernel vs reference; returns the kernel's result."""
    ref_out, ref_lse = case.oracle(**oracle_overrides)
    kernel = decode(case, implementation)
    reference = decode(case, "xla")
    out = to_f32(kernel[0])
    nan_expected = np.isnan(ref_out)
    assert not np.isnan(out[~nan_expected]).any(), "kernel output has NaN where none is expected"
    assert_matches(*kernel, ref_out, ref_lse, case.dtype, what="kernel out")
    assert_matches(*reference, ref_out, ref_lse, case.dtype, what="reference out")
    ref_impl_out = to_f32(reference[0]).astype(np.float64)
    assert_matches(*kernel, ref_impl_out, np.asarray(reference[1], np.float64), case.dtype, what="kernel vs reference out")
    return kernel


@pytest.mark.parametrize("spec", ORACLE_GRID)
def test_grid(rng, spec, kernel):
    check_kernel(make_case(rng, **spec), kernel)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_batch_sizes_varlen(rng, batch, dtype, kernel):
    seqlens = rng.integers(2, 3000, batch)
    if batch >= 3:
        seqlens[:2] = (1, 0)  # a one-key and an empty sequence among the others
    check_kernel(make_case(rng, seqlens=tuple(seqlens), s_q=2, h_q=16, causal=True, dtype=dtype, capacity=3000), kernel)


@pytest.mark.parametrize("h_q", [1, 16, 32, 64, 128])
@pytest.mark.parametrize("causal,s_q", [(False, 1), (True, 2)])
def test_query_heads(rng, h_q, causal, s_q, kernel):
    check_kernel(make_case(rng, seqlens=(1500, 77, 0, 1), s_q=s_q, h_q=h_q, causal=causal), kernel)


@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_block_sizes(rng, block_size, dtype, kernel):
    seqlens = (block_size - 1, block_size, block_size + 1, 5 * block_size + 3, 1)
    check_kernel(make_case(rng, seqlens=seqlens, s_q=2, h_q=16, causal=True, block_size=block_size, dtype=dtype,
                           spare_blocks=5), kernel)


@pytest.mark.parametrize("s_q", [1, 2, 3, 4])
@pytest.mark.parametrize("h_q", [3, 16, 24])
def test_causal_multi_token(rng, s_q, h_q, kernel):
    # Lengths shorter than s_q give rows that see no key; rows are packed s * groups + g,
    # so h_q 3 and 24 leave partly filled 16-row tiles.
    check_kernel(make_case(rng, seqlens=(0, 1, 2, 3, 700, 64), s_q=s_q, h_q=h_q, causal=True), kernel)


@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("s_q,h_q", [(1, 48), (1, 64), (3, 40), (2, 128)])
def test_wide_kernel(rng, s_q, h_q, dtype, block_size):
    """More than 32 query rows per KV head (the Hopper wide kernel's 64-row tiles): a
    partly filled tile (48 rows), one full tile, a second tile cut inside a query
    position (120 rows), four tiles; lengths around the 64-key tiles, with splits."""
    seqlens = (0, 1, 63, 65, 2000, 9000)
    check_kernel(make_case(rng, seqlens=seqlens, s_q=s_q, h_q=h_q, causal=True, dtype=dtype, block_size=block_size,
                           poison=np.nan))


@pytest.mark.parametrize("s_q,h_q,h_kv", [(7, 5, 1), (3, 48, 2), (2, 128, 2)])
def test_row_tiles_not_aligned_to_query_positions(rng, s_q, h_q, h_kv):
    """Packed rows (s * groups + g) whose 16-row tiles cut across query positions."""
    check_kernel(make_case(rng, seqlens=(3, 900, 6, 0), s_q=s_q, h_q=h_q, h_kv=h_kv, causal=True, d_qk=192,
                           head_dim_v=128))


def test_batch_beyond_the_grid_y_limit(rng):
    """More than 65535 sequences (a CUDA grid's y and z extents stop at 65535). vmap folds
    its axis into the batch, so e.g. vmap over 512 of a batch-128 call gets here."""
    batch = 65535 + 7
    seqlens = rng.integers(0, 33, batch)
    check_kernel(make_case(rng, seqlens=tuple(seqlens), capacity=32, block_size=16, h_q=1, d_qk=64, head_dim_v=64,
                           spare_blocks=0))


@pytest.mark.parametrize("s_k", [37, 1000, 4099])
def test_dense_cache_of_odd_length(rng, s_k):
    check_kernel(make_case(rng, seqlens=(s_k, s_k // 2, 0), s_q=2, h_q=16, causal=True, block_size=None, capacity=s_k))


@pytest.mark.slow
@pytest.mark.parametrize("causal,s_q", [(False, 1), (True, 2)])
def test_long_sequence_split_kv(rng, causal, s_q, kernel):
    """~70K keys for one sequence: the keys are split over many CTAs and combined."""
    check_kernel(make_case(rng, seqlens=(70001,), s_q=s_q, h_q=16, causal=causal, block_size=64), kernel)


def test_long_and_short_sequences_together(rng):
    check_kernel(make_case(rng, seqlens=(33333, 1, 0, 17000), s_q=1, h_q=16, block_size=256, dtype=jnp.float16))


@pytest.mark.parametrize("seqlen", [0, 1, 5, 300])
def test_large_capacity_short_sequence(rng, seqlen):
    """The number of splits comes from the capacity: most splits see no key at all."""
    check_kernel(make_case(rng, seqlens=(seqlen,), capacity=32768, s_q=2, h_q=16, causal=True))


@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_poison_past_seqlen_with_many_splits(rng, poison):
    case = make_case(rng, seqlens=(20000, 64, 0, 4097), capacity=24576, s_q=2, h_q=16, causal=True, poison=poison)
    out, lse = check_kernel(case)
    assert np.isfinite(to_f32(out)).all()


def test_seqlens_clamped_with_many_splits(rng):
    seqlens = (-3, 10**7, 2**31 - 1, 16000)
    case = make_case(rng, seqlens=seqlens, capacity=16384, s_q=1, h_q=16, poison=np.nan)
    check_kernel(case, cache_seqlens=np.clip(np.asarray(seqlens, np.int64), 0, 16384))


@pytest.mark.parametrize("column", [0, 100, 249], ids=["first", "middle", "last"])
def test_bad_block_with_many_splits(rng, column, kernel):
    case = make_case(rng, seqlens=(16000, 16000, 9), capacity=16000, s_q=1, h_q=16, block_size=64)
    table = np.asarray(case.block_table).copy()
    table[0, column] = -1
    table[2, 1:] = 2**31 - 1  # past sequence 2's only used block: ignored
    case = case.replace(block_table=jnp.asarray(table))
    out, lse = check_kernel(case, kernel)
    assert np.isnan(to_f32(out)[0]).all() and np.isnan(np.asarray(lse)[0]).all()
    assert np.isfinite(to_f32(out)[1:]).all()


@pytest.mark.parametrize("h_q", [16, 32, 128])
def test_deterministic(rng, h_q, kernel):
    """Two runs of the same call give bitwise identical results (no races)."""
    case = make_case(rng, seqlens=(40000, 3, 777), s_q=2, h_q=h_q, causal=True)
    a = decode(case, kernel)
    b = decode(case, kernel)
    np.testing.assert_array_equal(to_f32(a[0]), to_f32(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_default_implementation_runs_the_kernel(rng):
    case = make_case(rng, seqlens=(10, 99), s_q=2, h_q=16, causal=True)
    f = lambda *a: jax_etap.mla_decode(*a, causal=True)  # noqa: E731
    text = jax.jit(f).lower(*case.args).as_text()
    assert re.search(r"stablehlo\.custom_call\s+@[\w.]*jax_etap_mla_decode", text), "the kernel custom call is not in the GPU lowering"
    assert "stablehlo.exponential" not in text
    # And what runs by default is the kernel's result.
    default = jax.jit(f)(*case.args)
    kernel = decode(case, "etap")
    np.testing.assert_array_equal(to_f32(default[0]), to_f32(kernel[0]))
    np.testing.assert_array_equal(np.asarray(default[1]), np.asarray(kernel[1]))
    # implementation="xla" on the GPU is the reference: no custom call.
    text = jax.jit(lambda *a: jax_etap.mla_decode(*a, causal=True, implementation="xla")).lower(*case.args).as_text()
    assert not re.search(r"custom_call\s+@[\w.]*jax_etap_mla_decode", text)


def test_kernel_under_vmap(rng):
    cases = [make_case(rng, seqlens=(500 + i, 3 * i), s_q=2, h_q=16, causal=True, capacity=512) for i in range(3)]
    q, kv, s, t = (jnp.stack(x) for x in zip(*[c.args for c in cases]))
    f = lambda *a: jax_etap.mla_decode(*a, causal=True, implementation="etap")  # noqa: E731
    out, lse = jax.jit(jax.vmap(f))(q, kv, s, t)
    for i, c in enumerate(cases):
        ref_out, ref_lse = c.oracle()
        assert_matches(out[i], lse[i], ref_out, ref_lse, c.dtype)
