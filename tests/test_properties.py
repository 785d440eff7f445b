"""Property-based check: random shapes, layouts and lengths against the float64 oracle.

A few examples only (each is a new compilation); the grid in test_reference.py is the
systematic coverage. Tolerances: see mla_cases.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import assert_matches_oracle, decode, make_case

pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _specs(draw):
    d_qk = draw(st.sampled_from([64, 128, 192, 576]))
    h_kv = draw(st.sampled_from([1, 2]))
    h_q = h_kv * draw(st.sampled_from([1, 2, 3, 8]))
    batch = draw(st.integers(1, 4))
    capacity = draw(st.integers(1, 200))
    return dict(
        d_qk=d_qk,
        head_dim_v=draw(st.integers(1, d_qk)),
        h_kv=h_kv,
        h_q=h_q,
        s_q=draw(st.integers(1, 4)),
        causal=draw(st.booleans()),
        block_size=draw(st.sampled_from([16, 32, 64, None])),
        capacity=capacity,
        # Lengths from negative to past the capacity: clamped to [0, capacity].
        seqlens=tuple(draw(st.lists(st.integers(-3, capacity + 20), min_size=batch, max_size=batch))),
        dtype=draw(st.sampled_from([jnp.bfloat16, jnp.float16])),
        softmax_scale=draw(st.sampled_from([None, 0.05, 0.2])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs())
def test_random_problems_match_oracle(spec):
    seed = spec.pop("seed")
    case = make_case(np.random.default_rng(seed), **spec)
    for implementation in ("xla", None):
        out, lse = decode(case, implementation)
        assert_matches_oracle(out, lse, case)
