"""mla_decode_sparse's path through the dense decode kernels (jax_etap._sparse_gathered):
the selected rows gathered by XLA into a paged cache of their own, then mla_decode.

On a CPU the composition runs with mla_decode's reference in place of the kernels (its jnp
function, and its primitive's cpu lowering), so every convention of the sparse op is
checked through the composition against the float64 oracle; on a GPU the same cases run
on the kernels (mla_decode's default and the portable kernel). Lowered for cuda on any
machine, the call is one kernel custom call and none of the reference's softmax.

Broken on purpose once each: without the stable sort (skipped entries left in place,
inside the sequence's length) the oracle and poison tests failed; without giving a bad
row one key (its length left at 0) the NaN test failed.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import to_f32
from sparse_cases import ORACLE_CASES, SparseCase, assert_matches_sparse_oracle, make_sparse_case, with_unselected_tokens_nan

import jax_etap
from jax_etap._sparse_checks import check_sparse_args
from jax_etap._sparse_gathered import gathered_decode

KERNEL = jax_etap.kernel_available()
GPU_ONLY = pytest.mark.skipif(not KERNEL, reason="the CUDA kernel cannot run here")

# (how the composition is reached, mla_decode's implementation under it)
PATHS = [
    pytest.param(("composed", "xla"), id="composed-jnp"),  # mla_decode's jnp function
    pytest.param(("composed", None), id="composed-default"),  # its primitive: cpu lowering, or the kernels
    pytest.param(("api", "cuda"), id="cuda", marks=GPU_ONLY),
    pytest.param(("api", "portable"), id="portable", marks=GPU_ONLY),
]

FP8_CASES = [
    pytest.param(dict(h_q=16, s_q=2, topk=64, skipped=0.2, fp8_cache=True), id="fp8-h16-sq2"),
    pytest.param(dict(batch=3, h_q=128, topk=100, topk_length=(100, 3, 0), fp8_cache=True), id="fp8-h128-topk_length"),
]


def run(case: SparseCase, path) -> tuple[jax.Array, jax.Array]:
    route, implementation = path
    args = (case.q, case.kv_cache, case.indices, case.topk_length, case.attn_sink)
    if route == "api":
        fn = lambda *a: jax_etap.mla_decode_sparse(  # noqa: E731
            *a[:3], topk_length=a[3], attn_sink=a[4], head_dim_v=case.head_dim_v, softmax_scale=case.softmax_scale,
            implementation=implementation)
    else:
        shape = check_sparse_args(*args, case.head_dim_v, case.softmax_scale)
        fn = lambda *a: gathered_decode(*a, shape, implementation)  # noqa: E731
    return jax.jit(fn)(*args)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("params", ORACLE_CASES + FP8_CASES)
def test_matches_oracle(rng, params, path):
    case = make_sparse_case(rng, **params)
    assert_matches_sparse_oracle(*run(case, path), case, strict=False)


@pytest.mark.parametrize("path", PATHS)
def test_skipped_entries_read_nothing(rng, path):
    """Every token no row selects is NaN (token 0, which skipped entries point at in the
    gathered cache, included): the outputs stay finite."""
    case = make_sparse_case(rng, batch=2, s_q=2, h_q=16, topk=40, num_blocks=4, block_size=16)
    indices = np.asarray(case.indices).copy()
    indices[..., ::3] = -1
    indices[indices == 0] = 5
    case = with_unselected_tokens_nan(case, indices).replace(topk_length=jnp.asarray([40, 23], jnp.int32))
    out, lse = run(case, path)
    assert np.isfinite(to_f32(out)).all() and np.isfinite(np.asarray(lse)).all()
    assert_matches_sparse_oracle(out, lse, case, strict=False)


@pytest.mark.parametrize("path", PATHS)
def test_out_of_range_index_makes_only_its_row_nan(rng, path):
    """A used entry outside the cache makes its query row NaN, also where it is the row's
    only used entry, and leaves every other row as it is."""
    case = make_sparse_case(rng, batch=2, s_q=3, h_q=16, topk=70, num_blocks=2, block_size=64, skipped=0.2)
    indices = np.asarray(case.indices).copy()
    indices[1, 2, 5] = 128  # num_tokens
    indices[0, 1] = -1
    indices[0, 1, 3] = -7
    indices[0, 0, 69] = 2**31 - 1
    broken = case.replace(indices=jnp.asarray(indices))
    out, lse = run(broken, path)
    for b, i in ((1, 2), (0, 1), (0, 0)):
        assert np.isnan(to_f32(out[b, i])).all() and np.isnan(np.asarray(lse[b, :, i])).all()
    assert_matches_sparse_oracle(out, lse, broken, strict=False)


@pytest.mark.parametrize("path", PATHS)
def test_rows_that_select_nothing(rng, path):
    """topk_length 0 or negative, or only -1 entries: out 0 and lse -inf (and no NaN with
    a sink)."""
    case = make_sparse_case(rng, batch=3, s_q=2, h_q=16, topk=12, num_blocks=2, block_size=16, topk_length=(0, -7, 12),
                            attn_sink=np.linspace(-2, 2, 16))
    indices = np.asarray(case.indices).copy()
    indices[2, 1] = -1
    case = case.replace(indices=jnp.asarray(indices))
    out, lse = run(case, path)
    assert (to_f32(out[:2]) == 0).all() and np.isneginf(np.asarray(lse[:2])).all()
    assert (to_f32(out[2, 1]) == 0).all() and np.isneginf(np.asarray(lse[2, :, 1])).all()
    assert_matches_sparse_oracle(out, lse, case, strict=False)


@pytest.mark.skipif(not jax_etap.build_info()["cuda"], reason="jax_etap was built without CUDA: no cuda lowering")
def test_cuda_lowering_is_one_kernel_call(rng):
    """Lowered for cuda, "cuda" is the gather and one call of the decode kernel: no
    softmax (exponential) and no matmul (dot_general) of the references remain."""
    case = make_sparse_case(rng, batch=2, s_q=2, h_q=16, topk=100, skipped=0.1, topk_length=(100, 50))

    def lower(platform, implementation):
        fn = lambda q, kv, i, t: jax_etap.mla_decode_sparse(q, kv, i, topk_length=t, implementation=implementation)  # noqa: E731
        args = (case.q, case.kv_cache, case.indices, case.topk_length)
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    reference, cuda = lower("cpu", "xla"), lower("cuda", "cuda")
    calls = re.findall(r"stablehlo\.custom_call\s+@([\w.]*jax_etap_mla_decode[\w.]*)", cuda)
    assert len(calls) == 1 and calls[0] in jax_etap.build_info()["ffi_targets"]
    for marker in ("stablehlo.exponential", "stablehlo.dot_general"):
        assert marker in reference, f"{marker} should be in the reference's lowering (else the check is vacuous)"
        assert marker not in cuda, f"the cuda lowering holds the reference's {marker}"
    assert re.search(r"causal\s*=\s*false\b", cuda)
