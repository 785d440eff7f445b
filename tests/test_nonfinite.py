"""Non-finite values passed as data: NaN or +-inf in q, or in the cache inside a
sequence's valid range (test_safety.py covers what lies outside it).

The rule (docs/reliability.md): out and lse are what IEEE arithmetic over the keys each
row attends to gives, as the float64 oracle computes it, so the damage is visible and
contained:
  * a NaN in a row's q, or in a key the row attends to, makes that row's out and lse NaN;
  * an infinite value gives +-inf scores: a +inf score makes the row NaN (exp(inf - inf));
    a -inf score gives its key weight 0, whose value channels holding inf then become
    NaN (0 * inf);
  * every other row, head and sequence is untouched, and a row that sees no key stays
    empty (out 0, lse -inf) whatever its q holds;
  * one latitude: a causal query row masked from a key inside the sequence may still
    multiply that key's value by a zero probability (the kernel loads one key tile for
    all the query rows of a step), so its out channels where that value is non-finite
    may be NaN. Its lse and its other channels are exact.
A row whose every visible score is -inf (an infinite input aligned against every key) is
left unspecified; no test builds one (every poisoned row here sees dozens of keys of
random signs).

Each case runs for every implementation that can run on the default backend (see conftest).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from mla_cases import Case, assert_matches, decode, make_case, to_f32

NONFINITE = [np.nan, np.inf, -np.inf]
NONFINITE_IDS = ["nan", "inf", "-inf"]


def _poison_token(case: Case, b: int, token: int, channel: int, value: float) -> Case:
    """The case with ``value`` written in one channel of token ``token`` of sequence ``b``."""
    kv = to_f32(case.kv_cache).copy()
    block_size = kv.shape[1]
    block = int(np.asarray(case.block_table)[b, token // block_size])
    kv[block, token % block_size, :, channel] = value
    return case.replace(kv_cache=jnp.asarray(kv, case.dtype))


def _rows_masked_from(case: Case, b: int, token: int) -> np.ndarray:
    """Query rows of sequence b that a causal call masks from ``token`` (none if not causal)."""
    s_q = case.q.shape[1]
    if not case.causal:
        return np.zeros(s_q, bool)
    length = int(np.clip(int(case.cache_seqlens[b]), 0, case.capacity))
    return length - s_q + np.arange(s_q) + 1 <= token


def _apply_masked_row_latitude(out, ref_out, case: Case, b: int, masked_rows: np.ndarray, channel: int):
    """``out`` with the documented latitude taken: a NaN in ``channel`` of a masked row of
    sequence b is replaced by the oracle's value, so that everything else is compared."""
    out = to_f32(out).copy()
    if channel < case.head_dim_v:
        region = out[b, masked_rows, :, channel]
        nan = np.isnan(region)
        region[nan] = ref_out[b, masked_rows, :, channel][nan]
        out[b, masked_rows, :, channel] = region
    return jnp.asarray(out, case.dtype)


# Query heads: 16 (up to 32 packed rows, the ETAP kernel on Hopper, except at s_q 4) and 64
# (the wide kernel at every s_q, whose two consumer warpgroups exchange the rows' maxima).
HEADS = [16, 64]


@pytest.mark.parametrize("h_q", HEADS)
@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_nonfinite_query_stays_in_its_row(rng, implementation, value, h_q):
    """One non-finite q channel: NaN in exactly its own (out, lse) row, which stays empty
    (out 0, lse -inf) in the sequence with no key; every other row exact."""
    case = make_case(rng, seqlens=(0, 40, 300), s_q=2, h_q=h_q, block_size=64, causal=True)
    case = case.replace(q=case.q.at[:, 1, 3, 7].set(value))
    ref_out, ref_lse = case.oracle()
    assert np.isnan(ref_out[1:, 1, 3]).all() and np.isnan(ref_lse[1:, 3, 1]).all()
    assert np.isneginf(ref_lse[0]).all() and (ref_out[0] == 0).all()
    others = np.ones(ref_lse.shape, bool)
    others[:, 3, 1] = False
    assert np.isfinite(ref_lse[1:][others[1:]]).all()
    out, lse = decode(case, implementation)
    assert_matches(out, lse, ref_out, ref_lse, case.dtype)


# (spec, poisoned sequence, poisoned token): a causal step whose rows 0 and 1 are masked
# from the token (it is the sequence's second-to-last), and the middle of a long sequence,
# which the kernel splits over many CTAs and must carry through the combine.
PLACES = {
    "causal-tail": (dict(seqlens=(70, 130, 0), s_q=4, causal=True, block_size=16), 1, 128),
    "long-middle": (dict(seqlens=(70, 3000), s_q=1, causal=False, block_size=64), 1, 1501),
}
# (value, channel): channel 5 is in both K and V, channel 520 (>= head_dim_v = 512) in K
# only. NaN anywhere gives NaN scores; inf in K and V gives +inf scores (NaN rows) and
# -inf scores whose zero weight meets the inf value (0 * inf); -inf in K only gives
# dropped keys with nothing else in those heads.
POISONS = {"nan-kv": (np.nan, 5), "inf-kv": (np.inf, 5), "-inf-k": (-np.inf, 520)}


@pytest.mark.parametrize("h_q", HEADS)
@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
@pytest.mark.parametrize("place", PLACES.values(), ids=PLACES.keys())
def test_nonfinite_key_in_valid_range(rng, implementation, poison, place, h_q):
    spec, b, token = place
    value, channel = poison
    case = _poison_token(make_case(rng, h_q=h_q, **spec), b, token, channel, value)
    ref_out, ref_lse = case.oracle()
    masked = _rows_masked_from(case, b, token)
    seeing = ~masked
    # The test means something: rows that see the token are hit, everything else is finite.
    assert (np.isnan(ref_out[b, seeing]).any(axis=-1)).any()
    assert np.isfinite(ref_out[b, masked]).all() and np.isfinite(ref_lse[b][:, masked]).all()
    others = np.arange(case.q.shape[0]) != b
    assert np.isfinite(ref_out[others]).all() and not np.isnan(ref_lse[others]).any()

    out, lse = decode(case, implementation)
    if value != value:  # NaN: every row that sees the token is NaN through and through
        assert np.isnan(to_f32(out)[b, seeing]).all() and np.isnan(np.asarray(lse)[b][:, seeing]).all()
    out = _apply_masked_row_latitude(out, ref_out, case, b, masked, channel)
    assert_matches(out, lse, ref_out, ref_lse, case.dtype)


@pytest.mark.parametrize("value", NONFINITE, ids=NONFINITE_IDS)
def test_nonfinite_in_a_shared_block(rng, implementation, value):
    """Sequences 0 (45 tokens) and 1 (100) share one block: its slot 20 is token 52 of
    both, past the end of 0 and inside 1. A non-finite value there reaches 1 only."""
    case = make_case(rng, seqlens=(45, 100), capacity=128, block_size=32, h_q=4, d_qk=64, head_dim_v=64)
    table = np.asarray(case.block_table).copy()
    table[0, 1] = table[1, 1]
    case = _poison_token(case.replace(block_table=jnp.asarray(table, jnp.int32)), 1, 52, 3, value)
    ref_out, ref_lse = case.oracle()
    assert np.isnan(ref_out[1]).any() and np.isfinite(ref_out[0]).all()
    out, lse = decode(case, implementation)
    assert np.isfinite(to_f32(out)[0]).all() and np.isfinite(np.asarray(lse)[0]).all()
    assert_matches(out, lse, ref_out, ref_lse, case.dtype)
