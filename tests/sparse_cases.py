"""Random sparse decode problems and their comparison against the float64 oracle.

Shared by tests/test_sparse.py and tests/sparse_sharded_checks.py (which runs in its own
process with 8 host devices). Problems are drawn like mla_cases' (q and cache ~ N(0, 1),
rounded to bfloat16/float16 once; the oracle sees the rounded values).

Tolerances (against the float64 oracle on the same rounded inputs), from measured error:
the reference computes in float32 and rounds out to the input dtype once, and that
rounding is all of its error: measured over topk 8-2048, 16 heads, with and without a
sink, the relative error norm of out is 0.42-0.43 ulp of the dtype (2^-8 bfloat16,
2^-11 float16), the same at every topk, and lse is within 2e-7 * max(1, |lse|). The
bounds, 0.6 ulp and 1e-5, leave ~40% and ~50x margin; a missing, extra or duplicated-
once-too-often token, a dropped sink or a wrong scale move out by 1e-2..1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import numpy_fp8
import pytest
from mla_cases import assert_matches, relative_error, to_f32
from numpy_sparse_reference import mla_decode_sparse_numpy

import jax_etap
from jax_etap import fp8

ULP = {jnp.dtype(jnp.bfloat16): 2.0**-8, jnp.dtype(jnp.float16): 2.0**-11}
NUMPY_DTYPES = {jnp.dtype(jnp.bfloat16): ml_dtypes.bfloat16, jnp.dtype(jnp.float16): np.float16}
OUT_ULPS = 0.6
LSE_TOL = 1e-5


FP16 = jnp.float16
INF = np.inf

# Problems every path of mla_decode_sparse is checked on against the oracle.
ORACLE_CASES = [
    pytest.param(dict(batch=2, h_q=1, topk=1), id="h1-sq1-topk1"),
    # 48 tokens and 64 draws per row: every row repeats tokens.
    pytest.param(dict(batch=3, h_q=16, s_q=2, topk=64, num_blocks=3, block_size=16, skipped=0.2, dtype=FP16), id="h16-sq2-topk64-repeats-fp16"),
    pytest.param(dict(h_q=128, s_q=2, topk=32, dtype=FP16), id="h128-sq2-topk32-fp16"),
    pytest.param(dict(batch=4, h_q=64, s_q=4, topk=100, skipped=0.3, topk_length=(0, 150, 37, -3)), id="h64-sq4-topk100-topk_length"),
    pytest.param(dict(batch=1, h_q=8, s_q=3, topk=4096, num_blocks=128, skipped=0.1), id="h8-sq3-topk4096"),
    pytest.param(dict(h_q=128, topk=2048, num_blocks=64, dtype=FP16, topk_length=(2048, 1500)), id="h128-topk2048-fp16"),
    pytest.param(dict(h_q=8, s_q=2, topk=40, skipped=0.1, attn_sink=(INF, -INF, 0, 1.5, -2, 4, INF, -0.5)), id="h8-sink-mixed"),
    pytest.param(dict(h_q=3, topk=20, d_qk=64, head_dim_v=64, softmax_scale=0.3, num_blocks=50, block_size=1), id="d64-bs1-scale0.3"),
    pytest.param(dict(h_q=4, s_q=2, topk=17, d_qk=192, head_dim_v=131, dtype=FP16), id="d192-dv131-fp16"),
    pytest.param(dict(h_q=2, topk=0), id="topk0"),
]


@dataclasses.dataclass
class SparseCase:
    """One sparse decode problem: jax arrays for the call, kwargs for both call and oracle."""

    q: jax.Array
    kv_cache: jax.Array
    indices: jax.Array
    topk_length: jax.Array | None = None
    attn_sink: jax.Array | None = None
    head_dim_v: int = 512
    softmax_scale: float | None = None

    @property
    def dtype(self):
        return jnp.dtype(self.q.dtype)

    @property
    def num_tokens(self) -> int:
        return self.kv_cache.shape[0] * self.kv_cache.shape[1]

    @property
    def args(self):
        return (self.q, self.kv_cache, self.indices)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(
            topk_length=self.topk_length, attn_sink=self.attn_sink, head_dim_v=self.head_dim_v,
            softmax_scale=self.softmax_scale,
        )

    def replace(self, **changes) -> "SparseCase":
        return dataclasses.replace(self, **changes)

    def oracle_cache(self) -> np.ndarray:
        """The cache rows the oracle sees: an FP8 cache (uint8) dequantized to q's dtype by
        the layout's own NumPy oracle (tests/numpy_fp8.py), any other as it is."""
        if jnp.dtype(self.kv_cache.dtype) == jnp.uint8:
            return numpy_fp8.dequantize(np.asarray(self.kv_cache), NUMPY_DTYPES[self.dtype]).astype(np.float32)
        return to_f32(self.kv_cache)

    def oracle(self):
        optional = {k: None if v is None else np.asarray(v) for k, v in (("topk_length", self.topk_length), ("attn_sink", self.attn_sink))}
        return mla_decode_sparse_numpy(
            to_f32(self.q), self.oracle_cache(), np.asarray(self.indices),
            head_dim_v=self.head_dim_v, softmax_scale=self.softmax_scale, **optional,
        )


def make_sparse_case(
    rng: np.random.Generator,
    *,
    batch: int = 2,
    s_q: int = 1,
    h_q: int = 16,
    topk: int = 64,
    num_blocks: int = 8,
    block_size: int = 64,
    d_qk: int = 576,
    head_dim_v: int = 512,
    dtype=jnp.bfloat16,
    skipped: float = 0.0,
    topk_length=None,
    attn_sink=None,
    softmax_scale: float | None = None,
    fp8_cache: bool = False,
) -> SparseCase:
    """A random problem. Indices are drawn uniformly from the cache's tokens (with
    replacement: a topk near or above the token count repeats tokens); a fraction
    ``skipped`` of them is then set to -1. ``fp8_cache``: the cache, drawn in ``dtype``,
    is stored as `jax_etap.fp8` tokens (uint8, 656 bytes; d_qk must be 576)."""
    num_tokens = num_blocks * block_size
    indices = rng.integers(0, num_tokens, (batch, s_q, topk))
    indices[rng.random(indices.shape) < skipped] = -1
    q = jnp.asarray(rng.standard_normal((batch, s_q, h_q, d_qk)), dtype)
    kv_cache = jnp.asarray(rng.standard_normal((num_blocks, block_size, 1, d_qk)), dtype)
    return SparseCase(
        q=q,
        kv_cache=fp8.quantize(kv_cache) if fp8_cache else kv_cache,
        indices=jnp.asarray(indices, jnp.int32),
        topk_length=None if topk_length is None else jnp.asarray(topk_length, jnp.int32),
        attn_sink=None if attn_sink is None else jnp.asarray(attn_sink, jnp.float32),
        head_dim_v=head_dim_v,
        softmax_scale=softmax_scale,
    )


_jitted = jax.jit(jax_etap.mla_decode_sparse, static_argnames=("head_dim_v", "softmax_scale", "implementation"))


def decode_sparse(case: SparseCase, implementation=None, *, jit=True, **overrides):
    """``jax_etap.mla_decode_sparse`` of a case (under jit by default)."""
    kwargs = dict(case.kwargs, implementation=implementation)
    kwargs.update(overrides)
    return (_jitted if jit else jax_etap.mla_decode_sparse)(*case.args, **kwargs)


def assert_matches_sparse_oracle(out, lse, case: SparseCase, *, strict: bool = True):
    """out/lse against the oracle: mla_cases.assert_matches's checks (dtypes, shapes, NaN
    and -inf patterns, exact zeros in rows with no token, mla_decode's tolerances) and, if
    ``strict``, this module's tighter ones, which hold for the jnp reference (one rounding
    of a float32 result); the path through mla_decode (jax_etap._sparse_gathered) rounds
    its out first and applies the sink after it."""
    ref_out, ref_lse = case.oracle()
    assert_matches(out, lse, ref_out, ref_lse, case.dtype)
    if not strict:
        return
    finite = np.isfinite(ref_lse)
    if finite.any():
        lse = np.asarray(lse, np.float64)
        err = np.abs(lse[finite] - ref_lse[finite]) / np.maximum(1.0, np.abs(ref_lse[finite]))
        assert err.max() <= LSE_TOL, f"lse error {err.max():.3e} > {LSE_TOL}"
    compared = np.isfinite(ref_out)
    if np.any(ref_out[compared] != 0):
        rel = relative_error(to_f32(out)[compared], ref_out[compared])
        bound = OUT_ULPS * ULP[case.dtype]
        assert rel <= bound, f"out relative error {rel:.3e} > {bound:.3e} ({case.dtype.name})"


def with_unselected_tokens_nan(case: SparseCase, indices: np.ndarray) -> SparseCase:
    """The case with these indices and every cache token no entry of them selects set to
    NaN (token 0 too, which a gather may read for a skipped entry)."""
    poisoned = np.ones(case.num_tokens, bool)
    poisoned[indices[indices >= 0]] = False
    kv = to_f32(case.kv_cache).reshape(case.num_tokens, -1)
    kv[poisoned] = np.nan
    return case.replace(indices=jnp.asarray(indices), kv_cache=jnp.asarray(kv.reshape(case.kv_cache.shape), case.dtype))


def largest_traced_bytes(fn, *args) -> int:
    """The size in bytes of the largest value in ``fn``'s traced computation (inner
    jaxprs, e.g. of pjit or custom rules, included): a bound on what one call holds."""

    def largest(jaxpr) -> int:
        found = 0
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                found = max(found, int(np.prod(var.aval.shape)) * jnp.dtype(var.aval.dtype).itemsize)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    found = max(found, largest(inner))
        return found

    return largest(jax.make_jaxpr(fn)(*args).jaxpr)
