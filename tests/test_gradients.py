"""`jax.grad` through `mla_decode`: one gradient, the jnp reference's, under every
implementation (jax_etap._autodiff), checked against central differences of the float64
oracle.

The loss is a random weighting of out and lse, L = sum(w_out * out) + sum(w_lse * lse),
differentiated in q and kv_cache. Along unit directions d, the directional derivative
<grad L, d> must match (L(x + h d) - L(x - h d)) / 2h of the float64 oracle (h = 1e-3:
the truncation error, ~h^2 times the third derivative, is ~1e-6). The gradient comes back
in the inputs' dtype, each element rounded once (relative RMS ~eps/4), so along the
gradient's own direction <grad, d> is off by at most ~eps/4 * ||grad||, and along a random
direction by ~sqrt(size) less. The bounds are 8x those; a gradient that misses the
softmax scale, the lse term or the causal mask is off by far more.

Verified: scaling the backward pass's d_q by 1.01, or differentiating it without the
causal mask, fails test_gradient_matches_central_differences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import make_case, to_f32

import jax_etap

EPS = {jnp.dtype(jnp.bfloat16): 2.0**-7, jnp.dtype(jnp.float16): 2.0**-10}

PROBLEMS = [
    pytest.param(dict(seqlens=(20, 37, 0), s_q=2, h_q=4, h_kv=2, d_qk=64, head_dim_v=32, causal=True, block_size=16,
                      dtype=jnp.float16), id="paged-causal-fp16"),
    pytest.param(dict(seqlens=(9, 30), s_q=1, h_q=3, d_qk=128, head_dim_v=128, block_size=None, capacity=32,
                      softmax_scale=0.3, dtype=jnp.float16), id="dense-fp16"),
    pytest.param(dict(seqlens=(70,), s_q=3, h_q=16, d_qk=576, head_dim_v=512, causal=True, block_size=64,
                      dtype=jnp.bfloat16), id="d576-causal-bf16"),
]


IMPLEMENTATIONS = ["xla", None] + (["etap", "portable"] if jax_etap.kernel_available() else [])


def _loss(case, implementation, w_out, w_lse):
    def loss(q, kv):
        out, lse = jax_etap.mla_decode(q, kv, case.cache_seqlens, case.block_table, implementation=implementation,
                                       **case.kwargs)
        # A row that sees no key has lse -inf and no derivative: it carries no weight.
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse)

    return loss


def _oracle_loss(case, w_out, w_lse, q, kv):
    out, lse = case.oracle(q=q, kv_cache=kv)
    lse = np.where(np.isfinite(lse), lse, 0.0)
    return float(np.sum(out * w_out) + np.sum(lse * w_lse))


@pytest.mark.parametrize("spec", PROBLEMS)
def test_gradient_matches_central_differences(rng, spec):
    case = make_case(rng, **spec)
    batch, s_q, h_q, _ = case.q.shape
    w_out = rng.standard_normal((batch, s_q, h_q, case.head_dim_v)).astype(np.float32)
    w_lse = rng.standard_normal((batch, h_q, s_q)).astype(np.float32)
    q64, kv64, _, _ = (np.asarray(x, np.float64) if x is not None else None for x in case.numpy_args())
    gradients = {}
    for implementation in IMPLEMENTATIONS:
        d_q, d_kv = jax.jit(jax.grad(_loss(case, implementation, w_out, w_lse), argnums=(0, 1)))(case.q, case.kv_cache)
        assert d_q.dtype == case.dtype and d_kv.dtype == case.dtype
        gradients[implementation] = (to_f32(d_q).astype(np.float64), to_f32(d_kv).astype(np.float64))
    for implementation, (g_q, g_kv) in gradients.items():
        norm = np.sqrt(np.sum(g_q**2) + np.sum(g_kv**2))
        size = g_q.size + g_kv.size
        # Along the gradient itself (where a wrongly scaled or masked gradient shows in
        # full) and along two random directions (where every error shrinks by ~sqrt(size)).
        directions = [(g_q / norm, g_kv / norm, 1.0)]
        for _ in range(2):
            d_q, d_kv = rng.standard_normal(g_q.shape), rng.standard_normal(g_kv.shape)
            d_norm = np.sqrt(np.sum(d_q**2) + np.sum(d_kv**2))
            directions.append((d_q / d_norm, d_kv / d_norm, size**-0.5))
        for d_q, d_kv, shrink in directions:
            numeric = _central_difference(case, w_out, w_lse, q64, kv64, d_q, d_kv)
            analytic = np.sum(g_q * d_q) + np.sum(g_kv * d_kv)
            bound = 2 * EPS[case.dtype] * norm * shrink
            assert abs(analytic - numeric) <= bound, (
                f"implementation={implementation!r}: <grad, d> = {analytic:.6g}, central difference {numeric:.6g}, "
                f"bound {bound:.2e}")


def _central_difference(case, w_out, w_lse, q, kv, d_q, d_kv, h=1e-3):
    plus = _oracle_loss(case, w_out, w_lse, q + h * d_q, kv + h * d_kv)
    minus = _oracle_loss(case, w_out, w_lse, q - h * d_q, kv - h * d_kv)
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("spec", PROBLEMS[:1])
def test_every_implementation_has_the_reference_gradient(rng, spec):
    """The same gradient under every implementation: the reference's, bit for bit."""
    case = make_case(rng, **spec)
    w_out = rng.standard_normal((*case.q.shape[:3], case.head_dim_v)).astype(np.float32)
    w_lse = rng.standard_normal((case.q.shape[0], case.q.shape[2], case.q.shape[1])).astype(np.float32)
    grads = [jax.jit(jax.grad(_loss(case, i, w_out, w_lse), argnums=(0, 1)))(case.q, case.kv_cache) for i in IMPLEMENTATIONS]
    for implementation, (d_q, d_kv) in zip(IMPLEMENTATIONS[1:], grads[1:]):
        np.testing.assert_array_equal(to_f32(d_q), to_f32(grads[0][0]), err_msg=f"d_q, implementation={implementation!r}")
        np.testing.assert_array_equal(to_f32(d_kv), to_f32(grads[0][1]), err_msg=f"d_kv, implementation={implementation!r}")


def test_gradient_past_seqlen_and_in_unused_blocks_is_zero(rng):
    """Keys no row sees get no gradient, even where the cache holds NaN."""
    case = make_case(rng, seqlens=(20, 5), s_q=2, h_q=4, d_qk=64, head_dim_v=64, causal=True, block_size=16,
                     capacity=48, poison=np.nan)
    w_out = np.ones((2, 2, 4, 64), np.float32)
    w_lse = np.ones((2, 4, 2), np.float32)
    for implementation in IMPLEMENTATIONS:
        d_q, d_kv = jax.jit(jax.grad(_loss(case, implementation, w_out, w_lse), argnums=(0, 1)))(case.q, case.kv_cache)
        assert np.isfinite(to_f32(d_q)).all()
        d_kv = to_f32(d_kv)
        table = np.asarray(case.block_table)
        seen = np.zeros(d_kv.shape[:2], bool)
        for b, n in enumerate((20, 5)):
            t = np.arange(n)
            seen[table[b, t // 16], t % 16] = True
        assert (d_kv[~seen] == 0).all(), f"implementation={implementation!r}: gradient outside the sequences"
        assert np.isfinite(d_kv[seen]).all() and (d_kv[seen] != 0).any()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradient_in_q_on_an_fp8_cache_is_that_on_its_dequantized_rows(rng, implementation):
    """An FP8 cache's bytes get no gradient; q's is the one on the dequantized cache, also
    where the kernels read a gathered copy of the blocks the table names (a pool larger
    than the table)."""
    from jax_etap import fp8

    case = make_case(rng, seqlens=(40, 9), s_q=2, h_q=16, d_qk=576, head_dim_v=512, causal=True, block_size=16,
                     spare_blocks=12)
    data = fp8.quantize(case.kv_cache)
    w_out = jnp.asarray(rng.standard_normal((2, 2, 16, 512)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((2, 16, 2)), jnp.float32)
    got = jax.grad(lambda q: _loss(case, implementation, w_out, w_lse)(q, data))(case.q)
    expected = jax.grad(_loss(case, "xla", w_out, w_lse), argnums=0)(case.q, fp8.dequantize(data, case.q.dtype))
    np.testing.assert_array_equal(to_f32(got), to_f32(expected))
