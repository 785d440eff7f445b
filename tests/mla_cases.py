"""Random MLA decode problems and the comparison against the float64 oracle.

Every problem is drawn fresh from a `np.random.default_rng` (q and cache ~ N(0, 1), never
zeros) and rounded to bfloat16/float16 once; the oracle sees exactly those rounded values.

Tolerances (against the float64 oracle on the same rounded inputs). They are set from
measured error, so that a lost, duplicated or misread key fails them:
  * out: relative error norm ||out - ref|| / ||ref|| <= OUT_FLOOR_MULTIPLE * floor +
    OUT_FLOOR_SLACK[dtype], where floor = ||round(ref) - ref|| / ||ref|| is what rounding
    the exact result to bfloat16/float16 costs by itself (no implementation can do
    better). Measured on CPU (2026-12-04, commit f4c1a42, this module's ORACLE_GRID): the
    jnp reference sits at 1.000x the floor in every case, its floors ranging 4e-4..1.7e-3
    (bf16) and 4e-5..2.3e-4 (fp16). README (H200, benchmarks/numerics.py): the kernels
    sit at 1.00-1.19x the floor, the excess coming from rounding the softmax
    probabilities to the input dtype before P.V, which at most doubles the error variance
    (about sqrt(2) = 1.41x the floor). Hence 2x the floor. The slack, dtype eps / 16
    (4.9e-4 bf16, 6.1e-5 fp16), covers results whose exact value happens to be nearly
    representable (floor ~ 0: a row that sees one key) and float32 accumulation (~1e-6).
    A key dropped from 3,000 keys moves out by ~8e-3, far more than the ~3.5e-3 this
    allows at the largest bf16 floor; the dominant-key tests (test_dominant_keys.py) make
    a lost key move out by O(1) at any length.
    Comparing two implementations (both rounded: the expected values' own floor is 0),
    OUT_RTOL applies instead: 1e-2 bf16, 2e-3 fp16, about 3x two roundings.
  * lse: |lse - ref| <= LSE_TOL * max(1, |ref|), LSE_TOL = 1e-5. lse is computed in
    float32 from float32 scores, with no output rounding. Measured: the reference 7.5e-7
    at most on the grid (CPU, as above) and 6e-7 up to 70K keys; the kernels 1.6e-6 up to
    65K keys (README). 1e-5 is 6x the worst of these; a lost key at 3,000 keys moves lse
    by 1.3e-4, a duplicated key (an overlap at a split boundary) by up to log 2.
  * Rows that see no key must be exactly out == 0 and lse == -inf; NaN must appear
    exactly where the oracle has NaN (a sequence with a bad used block) and nowhere else.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_etap
from jax_etap.testing import capacity_of, clamped_seqlens, mla_decode_numpy, relative_error, to_f32

OUT_FLOOR_MULTIPLE = 2.0
OUT_FLOOR_SLACK = {jnp.dtype(jnp.bfloat16): 2.0**-7 / 16, jnp.dtype(jnp.float16): 2.0**-10 / 16}
OUT_RTOL = {jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 2e-3}  # implementation vs implementation
LSE_TOL = 1e-5

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


@dataclasses.dataclass
class Case:
    """One decode problem: jax arrays for the call, kwargs for both the call and oracle."""

    q: jax.Array
    kv_cache: jax.Array
    cache_seqlens: jax.Array
    block_table: jax.Array | None
    head_dim_v: int
    softmax_scale: float | None = None
    causal: bool = False

    @property
    def dtype(self):
        return jnp.dtype(self.q.dtype)

    @property
    def args(self):
        return (self.q, self.kv_cache, self.cache_seqlens, self.block_table)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(head_dim_v=self.head_dim_v, softmax_scale=self.softmax_scale, causal=self.causal)

    @property
    def capacity(self) -> int:
        return capacity_of(self.kv_cache, self.block_table)

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)

    def numpy_args(self):
        table = None if self.block_table is None else np.asarray(self.block_table)
        return (to_f32(self.q), to_f32(self.kv_cache), np.asarray(self.cache_seqlens), table)

    def oracle(self, **overrides):
        """float64 (out, lse) of this problem; overrides replace numpy args by name."""
        q, kv, seqlens, table = self.numpy_args()
        args = dict(q=q, kv_cache=kv, cache_seqlens=seqlens, block_table=table)
        args.update(overrides)
        return mla_decode_numpy(**args, **self.kwargs)


def make_case(
    rng: np.random.Generator,
    *,
    seqlens=(50, 130),
    s_q: int = 1,
    h_q: int = 16,
    h_kv: int = 1,
    d_qk: int = 576,
    head_dim_v: int = 512,
    dtype=jnp.bfloat16,
    block_size: int | None = 64,
    capacity: int | None = None,
    spare_blocks: int = 2,
    causal: bool = False,
    softmax_scale: float | None = None,
    poison: float | None = None,
) -> Case:
    """A random problem; ``block_size=None`` gives a dense cache.

    Paged: each sequence gets ceil(capacity / block_size) distinct blocks drawn by a random
    permutation of a pool that also holds ``spare_blocks`` blocks nobody references.
    capacity: tokens each sequence can hold; default the largest (positive) seqlen.
    poison: a value (NaN, inf, ...) written in every cache slot that holds no token of any
      sequence: past each sequence's clamped length, and in unreferenced blocks.
    """
    seqlens = np.asarray(seqlens, np.int64)
    batch = len(seqlens)
    if capacity is None:
        capacity = max(1, int(seqlens.max()))
    q = rng.standard_normal((batch, s_q, h_q, d_qk))
    if block_size is None:
        kv = rng.standard_normal((batch, capacity, h_kv, d_qk))
        table = None
        if poison is not None:
            for b, n in enumerate(np.clip(seqlens, 0, capacity)):
                kv[b, n:] = poison
    else:
        per_seq = max(1, -(-capacity // block_size))
        num_blocks = batch * per_seq + spare_blocks
        kv = rng.standard_normal((num_blocks, block_size, h_kv, d_qk))
        table = rng.permutation(num_blocks)[: batch * per_seq].reshape(batch, per_seq)
        if poison is not None:
            holds_token = np.zeros((num_blocks, block_size), bool)
            for b, n in enumerate(np.clip(seqlens, 0, per_seq * block_size)):
                t = np.arange(n)
                holds_token[table[b, t // block_size], t % block_size] = True
            kv[~holds_token] = poison
    seqlens32 = np.clip(seqlens, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
    return Case(
        q=jnp.asarray(q, dtype),
        kv_cache=jnp.asarray(kv, dtype),
        cache_seqlens=jnp.asarray(seqlens32, jnp.int32),
        block_table=None if table is None else jnp.asarray(table, jnp.int32),
        head_dim_v=head_dim_v,
        softmax_scale=softmax_scale,
        causal=causal,
    )


# One jitted function for every call: calls with the same shapes and options (e.g. a
# clean and a poisoned version of a case, or property-test examples) compile once.
_jitted_decode = jax.jit(
    jax_etap.mla_decode, static_argnames=("head_dim_v", "softmax_scale", "causal", "implementation")
)


def decode(case: Case, implementation=None, *, jit=True, **overrides):
    """``jax_etap.mla_decode`` of a case (under jit by default)."""
    kwargs = dict(case.kwargs, implementation=implementation)
    kwargs.update(overrides)
    fn = _jitted_decode if jit else jax_etap.mla_decode
    return fn(*case.args, **kwargs)


def decode_reference(case: Case, **overrides):
    kwargs = dict(case.kwargs)
    kwargs.update(overrides)
    fn = jax.jit(lambda q, kv, s, t: jax_etap.reference.mla_decode_reference(q, kv, s, t, **kwargs))
    return fn(*case.args)


def assert_matches(out, lse, ref_out, ref_lse, dtype, *, what="out"):
    """out/lse of an implementation against (float64 or other-implementation) out/lse.

    Checks: shapes and dtypes; NaN exactly where the expected values have NaN (element by
    element); lse -inf exactly where expected; those rows' out exactly 0; relative error
    norm of out (over the elements that are not NaN) and the lse error within the module's
    tolerances.
    """
    dtype = jnp.dtype(dtype)
    assert jnp.dtype(out.dtype) == dtype, f"{what} dtype {out.dtype}, expected {dtype}"
    assert jnp.dtype(lse.dtype) == jnp.float32, f"lse dtype {lse.dtype}, expected float32"
    out = to_f32(out).astype(np.float64)
    lse = np.asarray(lse, np.float64)
    ref_out = np.asarray(ref_out, np.float64)
    ref_lse = np.asarray(ref_lse, np.float64)
    assert out.shape == ref_out.shape, f"{what} shape {out.shape}, expected {ref_out.shape}"
    assert lse.shape == ref_lse.shape, f"lse shape {lse.shape}, expected {ref_lse.shape}"

    nan_rows = np.isnan(ref_lse)
    np.testing.assert_array_equal(np.isnan(lse), nan_rows, err_msg="lse NaN pattern differs")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out), err_msg=f"{what} NaN pattern differs")
    assert np.isfinite(out[~np.isnan(ref_out)]).all(), f"{what} has inf where a finite value is expected"

    empty = np.isneginf(ref_lse)  # [b, h, s]
    np.testing.assert_array_equal(np.isneginf(lse), empty, err_msg="lse -inf pattern (rows that see no key) differs")
    assert not np.isposinf(lse).any(), "lse has +inf"
    empty_out = np.transpose(empty, (0, 2, 1))  # [b, s, h]
    assert (out[empty_out] == 0).all(), f"{what} is not exactly 0 in rows that see no key"

    finite = np.isfinite(ref_lse)
    if finite.any():
        err = np.abs(lse[finite] - ref_lse[finite]) / np.maximum(1.0, np.abs(ref_lse[finite]))
        assert err.max() <= LSE_TOL, f"lse error {err.max():.3e} > {LSE_TOL}"
    # Elements with a value to compare: rows with a finite lse, minus single channels that
    # are NaN in both (a key dropped with a -inf score whose value is inf gives 0 * inf).
    compared = np.transpose(finite, (0, 2, 1))[..., None] & ~np.isnan(ref_out)
    if compared.any():
        rel = relative_error(out[compared], ref_out[compared])
        tol = out_tolerance(ref_out[compared], dtype)
        assert rel <= tol, f"{what} relative error {rel:.3e} > {tol:.2e} ({dtype.name})"


def out_tolerance(expected: np.ndarray, dtype) -> float:
    """The bound on out's relative error norm against ``expected`` (see the module doc)."""
    dtype = jnp.dtype(dtype)
    floor = relative_error(expected.astype(dtype).astype(np.float64), expected)
    if floor == 0:  # expected is itself rounded to dtype: another implementation's result
        return OUT_RTOL[dtype]
    return OUT_FLOOR_MULTIPLE * floor + OUT_FLOOR_SLACK[dtype]


def assert_matches_oracle(out, lse, case: Case, **oracle_overrides):
    ref_out, ref_lse = case.oracle(**oracle_overrides)
    assert_matches(out, lse, ref_out, ref_lse, case.dtype)


def assert_same_result(a, b, *, rel=2e-3, lse_tol=1e-5):
    """Two results of the same computation (e.g. vmap vs a loop, jit vs eager, export).

    They may differ only by float32 reassociation and the bf16/fp16 rounding it flips
    (1 ulp = 2^-8 relative in bf16, on a few elements): identical NaN / -inf / zero
    patterns, out within a 2e-3 relative error norm and lse within 1e-5 * max(1, |lse|).
    A wrong index under vmap gives errors of order 1.
    """
    (out_a, lse_a), (out_b, lse_b) = a, b
    assert out_a.shape == out_b.shape and out_a.dtype == out_b.dtype
    assert lse_a.shape == lse_b.shape and lse_a.dtype == lse_b.dtype
    out_a, out_b = to_f32(out_a).astype(np.float64), to_f32(out_b).astype(np.float64)
    lse_a, lse_b = np.asarray(lse_a, np.float64), np.asarray(lse_b, np.float64)
    np.testing.assert_array_equal(np.isnan(out_a), np.isnan(out_b))
    np.testing.assert_array_equal(np.isnan(lse_a), np.isnan(lse_b))
    np.testing.assert_array_equal(np.isneginf(lse_a), np.isneginf(lse_b))
    finite = np.isfinite(lse_b)
    if finite.any():
        err = np.abs(lse_a[finite] - lse_b[finite]) / np.maximum(1.0, np.abs(lse_b[finite]))
        assert err.max() <= lse_tol, f"lse differs by {err.max():.3e}"
    ok = ~np.isnan(out_b)
    if ok.any() and np.linalg.norm(out_b[ok]) > 0:
        assert relative_error(out_a[ok], out_b[ok]) <= rel
    else:
        np.testing.assert_array_equal(out_a[ok], out_b[ok])


# The grid every implementation is checked on against the oracle (CPU: test_reference;
# GPU kernel: test_gpu_kernel).
# (d_qk, head_dim_v) x (h_kv, h_q) x dtype; the query layout (causal, s_q), the cache
# layout (block size or dense) and the sequence lengths cycle over the grid so that every
# value of each appears with several of the others.
DIMS = [(576, 512), (128, 64), (64, 64)]
HEADS = [(1, 1), (1, 3), (1, 16), (2, 16), (2, 2)]
QUERIES = [(False, 1), (True, 1), (True, 2), (True, 4), (False, 3), (False, 2)]
LAYOUTS = [64, 16, 256, None]
LENGTHS = [(0, 1, 37, 130), (1, 64, 257), (5, 16, 17, 300, 0), (200, 3), (65,)]


def _grid():
    for i, ((d, dv), (h_kv, h_q), dtype) in enumerate(itertools.product(DIMS, HEADS, DTYPES)):
        causal, s_q = QUERIES[i % len(QUERIES)]
        block_size = LAYOUTS[i % len(LAYOUTS)]
        seqlens = LENGTHS[i % len(LENGTHS)]
        layout = "dense" if block_size is None else f"bs{block_size}"
        name = f"d{d}-dv{dv}-hkv{h_kv}-hq{h_q}-{dtype}-{'causal' if causal else 'full'}-sq{s_q}-{layout}-L{'_'.join(map(str, seqlens))}"
        yield pytest.param(
            dict(d_qk=d, head_dim_v=dv, h_kv=h_kv, h_q=h_q, dtype=DTYPES[dtype], causal=causal, s_q=s_q,
                 block_size=block_size, seqlens=seqlens),
            id=name,
        )


_SPECIAL = [
    pytest.param(dict(d_qk=192, head_dim_v=131, h_q=2, seqlens=(250, 7)), id="dv-odd"),
    pytest.param(dict(d_qk=576, head_dim_v=576, h_q=16, seqlens=(200,)), id="dv-equals-d"),
    pytest.param(dict(d_qk=576, head_dim_v=1, h_q=4, seqlens=(33, 90)), id="dv-1"),
    pytest.param(dict(d_qk=320, head_dim_v=256, h_q=4, h_kv=4, seqlens=(100, 64)), id="d320-hkv4-g1"),
    pytest.param(dict(d_qk=64, head_dim_v=64, h_q=8, h_kv=4, s_q=2, causal=True, seqlens=(50, 3)), id="hkv4-g2"),
    pytest.param(dict(h_q=16, seqlens=(500, 90), softmax_scale=0.3), id="scale-0.3"),
    pytest.param(dict(h_q=3, s_q=2, seqlens=(70, 9), softmax_scale=0.01, causal=True, dtype=jnp.float16), id="scale-0.01-fp16"),
    pytest.param(dict(h_q=4, seqlens=(40, 41), softmax_scale=2.0, d_qk=64, head_dim_v=64), id="scale-2-sharp"),
    pytest.param(dict(h_q=16, s_q=4, seqlens=(0, 0, 0), causal=True), id="all-empty"),
    pytest.param(dict(h_q=16, s_q=2, seqlens=(3, 1), causal=False, block_size=None, capacity=37), id="dense-sk37"),
    pytest.param(dict(h_q=16, s_q=4, seqlens=(3, 2, 1), causal=True, block_size=16), id="causal-sq-exceeds-L"),
]


ORACLE_GRID = list(_grid()) + _SPECIAL

__all__ = [
    "Case",
    "DTYPES",
    "LSE_TOL",
    "ORACLE_GRID",
    "OUT_FLOOR_MULTIPLE",
    "OUT_FLOOR_SLACK",
    "OUT_RTOL",
    "assert_matches",
    "assert_matches_oracle",
    "assert_same_result",
    "capacity_of",
    "clamped_seqlens",
    "decode",
    "decode_reference",
    "make_case",
    "out_tolerance",
    "relative_error",
    "to_f32",
]
