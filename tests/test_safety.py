"""Runtime-value safety: what bad runtime values (which cannot raise inside jit) must do.

* cache values past a sequence's length, and in blocks no sequence uses, never reach the
  output, even NaN or inf;
* cache_seqlens are clamped to [0, capacity];
* a block_table entry outside [0, num_blocks) among a sequence's used blocks makes all
  of that sequence's out and lse NaN (other sequences unaffected); entries past the used
  blocks are ignored, whatever they hold.

Non-finite values passed as data (in q, or in the cache inside a sequence's valid range)
are test_nonfinite.py's subject.

Each case runs for every implementation that can run on the default backend (the jnp
reference, the default choice, and the CUDA kernel where available: see conftest).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import assert_matches_oracle, decode, make_case, to_f32

INT32_MAX = np.iinfo(np.int32).max
INT32_MIN = np.iinfo(np.int32).min
FLASHMLA_UNUSED_ENTRY = 2147480000  # what FlashMLA's test writes in unused block-table entries


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "layout",
    [dict(block_size=16), dict(block_size=64), dict(block_size=None, capacity=150)],
    ids=["bs16", "bs64", "dense"],
)
@pytest.mark.parametrize("causal,s_q", [(False, 1), (True, 3)])
def test_cache_past_seqlen_never_reaches_the_output(rng, implementation, poison, layout, causal, s_q):
    spec = dict(seqlens=(0, 1, 17, 64, 100), s_q=s_q, h_q=3, d_qk=128, head_dim_v=128, causal=causal, **layout)
    case = make_case(rng, poison=poison, **spec)
    kv = to_f32(case.kv_cache)
    assert np.isnan(kv).any() if np.isnan(poison) else np.isinf(kv).any()  # the poison is there
    out, lse = decode(case, implementation)
    assert_matches_oracle(out, lse, case)
    assert np.isfinite(to_f32(out)).all()
    assert not np.isnan(np.asarray(lse)).any()


def test_poison_in_the_partial_last_block(rng, implementation):
    """NaN right after the last token, in the same block and tile as valid keys."""
    case = make_case(rng, seqlens=(65, 127, 1), h_q=16, block_size=64, poison=np.nan, s_q=2, causal=True)
    out, lse = decode(case, implementation)
    assert_matches_oracle(out, lse, case)
    assert np.isfinite(to_f32(out)).all()


@pytest.mark.parametrize("block_size", [16, 64, None])
def test_seqlens_are_clamped(rng, implementation, block_size):
    capacity = 128
    seqlens = (-5, capacity + 1, 10**6, INT32_MIN, INT32_MAX, 40, -1, 0)
    case = make_case(rng, seqlens=seqlens, capacity=capacity, block_size=block_size, h_q=3, d_qk=64, head_dim_v=64,
                     s_q=2, causal=True, poison=np.nan)
    assert case.capacity == capacity  # a multiple of every block size used
    out, lse = decode(case, implementation)
    clamped = np.clip(np.asarray(seqlens, np.int64), 0, capacity)
    assert_matches_oracle(out, lse, case, cache_seqlens=clamped)
    lse = np.asarray(lse)
    out = to_f32(out)
    for b in np.flatnonzero(clamped == 0):  # negative -> 0: every row sees no key
        assert np.isneginf(lse[b]).all() and (out[b] == 0).all()
    # Past the capacity -> the capacity: same as asking for exactly the capacity.
    exact = decode(case.replace(cache_seqlens=jnp.asarray(clamped, jnp.int32)), implementation)
    np.testing.assert_array_equal(to_f32(exact[0]), out)
    np.testing.assert_array_equal(np.asarray(exact[1]), lse)


BAD_VALUES = [-1, -7, "num_blocks", "num_blocks+5", INT32_MAX, INT32_MIN]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=[str(v) for v in BAD_VALUES])
@pytest.mark.parametrize("where", ["first", "middle", "last-partial"])
def test_bad_used_block_makes_that_sequence_nan(rng, implementation, bad, where):
    block_size = 16
    seqlens = (70, 70, 33, 0)  # 70 tokens: 5 used blocks (the last partly)
    case = make_case(rng, seqlens=seqlens, capacity=96, block_size=block_size, h_q=4, d_qk=64, head_dim_v=64, s_q=2,
                     causal=True)
    num_blocks = case.kv_cache.shape[0]
    value = {"num_blocks": num_blocks, "num_blocks+5": num_blocks + 5}.get(bad, bad)
    table = np.asarray(case.block_table).copy()
    column = {"first": 0, "middle": 2, "last-partial": 4}[where]
    table[1, column] = value
    table[3, :] = value  # sequence 3 has length 0: it uses no block, so nothing is bad
    case = case.replace(block_table=jnp.asarray(table, jnp.int32))
    out, lse = decode(case, implementation)
    out_np, lse_np = to_f32(out), np.asarray(lse)
    assert np.isnan(out_np[1]).all(), "every out value of the sequence with a bad used block is NaN"
    assert np.isnan(lse_np[1]).all(), "every lse value of the sequence with a bad used block is NaN"
    assert np.isneginf(lse_np[3]).all() and (out_np[3] == 0).all()
    assert_matches_oracle(out, lse, case)  # NaN exactly there; the other sequences are right


def test_bad_blocks_in_several_sequences(rng, implementation):
    case = make_case(rng, seqlens=(64, 65, 128, 1, 200), capacity=256, block_size=64, h_q=16, s_q=1)
    table = np.asarray(case.block_table).copy()
    num_blocks = case.kv_cache.shape[0]
    table[1, 1] = num_blocks  # token 64 of sequence 1 lives there: bad
    table[2, 1] = -1  # sequence 2 uses blocks 0 and 1: bad
    table[0, 1] = -1  # sequence 0 (64 tokens) uses block 0 only: ignored
    table[3, 1:] = INT32_MAX  # sequence 3 uses block 0 only: ignored
    case = case.replace(block_table=jnp.asarray(table, jnp.int32))
    out, lse = decode(case, implementation)
    assert_matches_oracle(out, lse, case)
    bad = np.isnan(np.asarray(lse)).all(axis=(1, 2))
    np.testing.assert_array_equal(bad, [False, True, True, False, False])


@pytest.mark.parametrize("junk", [-1, "num_blocks", INT32_MAX, INT32_MIN], ids=["-1", "num_blocks", "int32max", "int32min"])
def test_entries_past_the_used_blocks_are_ignored(rng, implementation, junk):
    case = make_case(rng, seqlens=(1, 64, 65, 0, 130), capacity=256, block_size=64, h_q=3, d_qk=128, head_dim_v=96,
                     s_q=2, causal=True)
    clean = decode(case, implementation)
    table = np.asarray(case.block_table).copy()
    value = case.kv_cache.shape[0] if junk == "num_blocks" else junk
    for b, n in enumerate((1, 64, 65, 0, 130)):
        table[b, -(-n // 64):] = value
    dirty = case.replace(block_table=jnp.asarray(table, jnp.int32))
    out, lse = decode(dirty, implementation)
    assert np.isfinite(to_f32(out)).all() and not np.isnan(np.asarray(lse)).any()
    assert_matches_oracle(out, lse, dirty)
    np.testing.assert_array_equal(to_f32(out), to_f32(clean[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(clean[1]))


def test_flashmla_style_poisoned_cache(rng, implementation):
    """FlashMLA's own test setup at its shapes: shuffled blocks, NaN in every cache slot
    that holds no token (the tail of each last block and every unused block), unused
    block-table entries set to FlashMLA's trap value, and empty sequences."""
    seqlens = (0, 1, 63, 64, 65, 300, 0, 129)
    case = make_case(rng, seqlens=seqlens, capacity=320, block_size=64, h_q=16, s_q=2, causal=True, poison=np.nan,
                     spare_blocks=4)
    table = np.asarray(case.block_table).copy()
    for b, n in enumerate(seqlens):
        table[b, -(-n // 64):] = FLASHMLA_UNUSED_ENTRY
    case = case.replace(block_table=jnp.asarray(table, jnp.int32))
    out, lse = decode(case, implementation)
    assert np.isfinite(to_f32(out)).all() and not np.isnan(np.asarray(lse)).any()
    assert_matches_oracle(out, lse, case)


def test_shared_blocks(rng, implementation):
    """Sequences may share blocks (a common prefix): token t of b is read from its table entry."""
    case = make_case(rng, seqlens=(100, 120, 64), capacity=128, block_size=32, h_q=4, d_qk=64, head_dim_v=64)
    table = np.asarray(case.block_table).copy()
    table[1, :2] = table[0, :2]  # sequences 0 and 1 share their first 64 tokens
    table[2, :] = table[0, ::-1]  # sequence 2 reads sequence 0's blocks in reverse order
    case = case.replace(block_table=jnp.asarray(table, jnp.int32))
    out, lse = decode(case, implementation)
    assert_matches_oracle(out, lse, case)


@pytest.mark.parametrize("layout", ["dense-s_k-0", "paged-0-blocks-per-seq"])
def test_zero_capacity(rng, implementation, layout):
    """A cache that can hold no token: every seqlen clamps to 0, every row is empty."""
    q = jnp.asarray(rng.standard_normal((3, 2, 4, 64)), jnp.bfloat16)
    seqlens = jnp.asarray([5, 0, -2], jnp.int32)
    if layout == "dense-s_k-0":
        kv = jnp.zeros((3, 0, 1, 64), jnp.bfloat16)
        table = None
    else:
        kv = jnp.asarray(rng.standard_normal((4, 16, 1, 64)), jnp.bfloat16)
        table = jnp.zeros((3, 0), jnp.int32)
    case = make_case(rng, seqlens=(1,)).replace(q=q, kv_cache=kv, cache_seqlens=seqlens, block_table=table,
                                                head_dim_v=64, causal=True)
    out, lse = decode(case, implementation)
    assert out.shape == (3, 2, 4, 64) and lse.shape == (3, 4, 2)
    assert (to_f32(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
    assert_matches_oracle(out, lse, case)


@pytest.mark.parametrize("h_kv,h_q", [(2, 8), (4, 4)])
def test_bad_used_block_with_several_kv_heads(rng, implementation, h_kv, h_q):
    case = make_case(rng, seqlens=(40, 40, 40), capacity=48, block_size=16, h_q=h_q, h_kv=h_kv, d_qk=64,
                     head_dim_v=64, s_q=2, causal=True)
    table = np.asarray(case.block_table).copy()
    table[1, 2] = case.kv_cache.shape[0]
    case = case.replace(block_table=jnp.asarray(table))
    out, lse = decode(case, implementation)
    assert np.isnan(to_f32(out)[1]).all() and np.isnan(np.asarray(lse)[1]).all()
    assert_matches_oracle(out, lse, case)
