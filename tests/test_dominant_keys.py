"""A dominant key at every cut the kernels make: a lost, duplicated or misread key fails.

In each call, every query row r (query position i, head h) has one key aligned with it: q's
channel c_r is ALPHA and that key's channel c_r is BETA, so the key's score beats every
other by ~30 (softmax weight 1 - 1e-13) and row r's output is that key's value. Losing the
key moves out by O(1) and lse by ~30; reading it twice moves lse by log 2; reading another
key in its place moves out by O(1). The dominant keys sit at 0, at each row's last key, on
both sides of every 64-key tile and cache-block boundary, and on both sides of every
split-KV cut that the scheduler makes for the kernel, the rows and the GPU at hand
(schedule_model.py, the C++ rule in Python). Every result is also checked against the
float64 oracle with mla_cases' tolerances.

Kernels: "etap" is the ETAP kernel up to 32 rows and the wide kernel above, "portable" the
sm_80 kernel; their rules place the cuts differently. The "reference" variants run the
default implementation (the jnp reference on CPU) at each kernel's cuts; the kernel
variants need a CUDA GPU and skip elsewhere. Without a GPU the cuts are an H100's/H200's
(132 SMs, Hopper).

The check itself is shown to fail on CPU (test_the_check_catches_*): a split-KV model of
the kernels in float64, cut where the scheduler model cuts, passes it, and fails it with a
key dropped at a cut, a cut off by one either way (a key lost or counted twice), or one
block read through the wrong table entry. Verified: each of those defect tests fails when
its defect is removed from the model (the check then passes), and
test_the_scheduler_model_cuts fails when schedule_model's part_begin rounds up.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import schedule_model
from mla_cases import Case, assert_matches_oracle, decode, make_case, relative_error, to_f32

import jax_etap

KERNEL = jax_etap.kernel_available()

ALPHA, BETA, Q_NOISE = 16.0, 64.0, 0.25  # scores: dominant ~43, the others ~N(0, 0.7)
SPLIT_SEQLEN = 64 * 150 + 37  # 151 tiles: every one of 132 parts cuts the sequence
TILE_SEQLEN = 64 * 8 + 13

# (s_q, h_q) at h_kv = 1: 16, 32, 48 (a partly filled wide tile), 64 and 128 rows.
ROWS = [(1, 16), (2, 8), (1, 32), (2, 16), (3, 16), (4, 16), (1, 64), (1, 128), (4, 32)]
ROW_IDS = [f"sq{s}-hq{h}-rows{s * h}" for s, h in ROWS]


def _gpu() -> tuple[int, tuple[int, int]]:
    """(SMs, compute capability) of the GPU the kernels run on; an H100's without one."""
    if not KERNEL:
        return schedule_model.MAX_PARTS, (9, 0)
    device = jax.devices()[0]
    major, minor = str(device.compute_capability).split(".")
    return int(device.core_count), (int(major), int(minor))


def cuts_for(kernel: str, seqlens, capacity: int, *, s_q: int, h_q: int, d_qk=576, head_dim_v=512, block_size=64):
    """Per sequence, the keys at which the kernel's split-KV schedule starts a new part."""
    sms, capability = _gpu()
    chosen = schedule_model.kernel_for(kernel, capability=capability, d_qk=d_qk, head_dim_v=head_dim_v,
                                       rows=s_q * h_q, block_size=block_size)
    parts = schedule_model.num_parts(sms, rows=s_q * h_q, h_kv=1, kernel=chosen)
    return schedule_model.split_boundaries(seqlens, capacity, parts)


@dataclasses.dataclass
class Placed:
    """One call's problem and, per query row (i, h), the position of its dominant key."""

    case: Case
    positions: np.ndarray  # [s_q, h_q]


def place(rng, positions, *, seqlen: int, s_q: int, h_q: int, block_size: int | None = 64, dtype=jnp.bfloat16):
    """Calls (batch 1) that together put a dominant key at every position given.

    Each call gives its s_q * h_q rows distinct positions, the largest to the last query
    positions (under causal masking only they see a sequence's last keys); rows left over
    in the last call take positions again from the start.
    """
    positions = sorted(set(int(p) for p in positions))
    rows = s_q * h_q
    channel = np.arange(rows).reshape(s_q, h_q)  # row (i, h) owns q/key channel i * h_q + h
    base = make_case(rng, seqlens=(seqlen,), s_q=s_q, h_q=h_q, causal=s_q > 1, block_size=block_size, dtype=dtype)
    base_kv = to_f32(base.kv_cache)
    table = None if base.block_table is None else np.asarray(base.block_table)
    calls = []
    for start in range(0, len(positions), rows):
        chunk = positions[start : start + rows]
        chunk = sorted(chunk + [positions[k % len(positions)] for k in range(rows - len(chunk))])
        at = np.asarray(chunk).reshape(s_q, h_q)  # sorted: row-major, the last query gets the last keys
        assert (at <= seqlen - s_q + np.arange(s_q)[:, None]).all(), "a row's dominant key is not visible to it"
        q = Q_NOISE * rng.standard_normal(base.q.shape)
        q[0, np.arange(s_q)[:, None], np.arange(h_q)[None, :], channel] += ALPHA
        kv = base_kv.copy()
        for p, c in zip(at.ravel(), channel.ravel()):
            block, slot = (0, p) if table is None else (table[0, p // block_size], p % block_size)
            kv[block, slot, 0, c] = BETA
        case = base.replace(q=jnp.asarray(q, dtype), kv_cache=jnp.asarray(kv, dtype))
        calls.append(Placed(case, at))
    return calls


def dominant_value(placed: Placed) -> np.ndarray:
    """[s_q, h_q, head_dim_v]: the value of each row's dominant key."""
    q, kv, seqlens, table = placed.case.numpy_args()
    keys = kv[0] if table is None else kv[table[0]].reshape(-1, *kv.shape[2:])
    return keys[placed.positions, 0, : placed.case.head_dim_v]


def check(out, lse, placed: Placed) -> None:
    """The result of one call: the float64 oracle's, and each row's out its dominant value."""
    assert_matches_oracle(out, lse, placed.case)
    got = to_f32(out)[0].astype(np.float64)
    value = dominant_value(placed)
    for i, h in np.ndindex(placed.positions.shape):
        err = relative_error(got[i, h], value[i, h])
        assert err <= 1e-2, f"row (query {i}, head {h}): out is not its dominant key {placed.positions[i, h]}'s value ({err:.2e})"


def tile_positions(seqlen: int, s_q: int, block_size: int | None, cuts) -> set[int]:
    edges = set(range(schedule_model.TILE_KEYS, seqlen, schedule_model.TILE_KEYS)) | set(cuts)
    if block_size is not None:
        edges |= set(range(block_size, seqlen, block_size))
    around = {p for e in edges for p in (e - 1, e)}
    return {0} | around | {seqlen - s_q + i for i in range(s_q)}


GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not KERNEL, reason="the CUDA kernel cannot run here")]
# "reference": the default implementation (the jnp reference on CPU) at the cuts of both
# kernels; "etap", "portable": that kernel at its own cuts.
IMPLEMENTATIONS = ["reference", pytest.param("etap", marks=GPU_ONLY), pytest.param("portable", marks=GPU_ONLY)]


def _cuts(implementation, seqlen, *, s_q, h_q, block_size=64):
    kernels = ("etap", "portable") if implementation == "reference" else (implementation,)
    return set().union(*(cuts_for(k, (seqlen,), seqlen, s_q=s_q, h_q=h_q, block_size=block_size)[0] for k in kernels))


def _run(placed_calls, implementation):
    for placed in placed_calls:
        out, lse = decode(placed.case, None if implementation == "reference" else implementation)
        check(out, lse, placed)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("s_q,h_q", ROWS, ids=ROW_IDS)
def test_split_boundaries(rng, implementation, s_q, h_q):
    """Batch 1 over 151 tiles, cut into as many parts as the kernel makes (132 at 16 rows
    on an H100): a dominant key on both sides of every cut."""
    cuts = _cuts(implementation, SPLIT_SEQLEN, s_q=s_q, h_q=h_q)
    assert len(cuts) >= 15  # even the portable kernel at 128 rows splits 16 ways
    positions = {0} | {p for c in cuts for p in (c - 1, c)} | {SPLIT_SEQLEN - s_q + i for i in range(s_q)}
    _run(place(rng, positions, seqlen=SPLIT_SEQLEN, s_q=s_q, h_q=h_q), implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("block_size,dtype", [(16, jnp.float16), (64, jnp.bfloat16), (256, jnp.bfloat16), (None, jnp.float16)],
                         ids=["bs16-fp16", "bs64-bf16", "bs256-bf16", "dense-fp16"])
@pytest.mark.parametrize("s_q,h_q", ROWS, ids=ROW_IDS)
def test_tile_and_block_boundaries(rng, implementation, s_q, h_q, block_size, dtype):
    """Nine tiles: a dominant key at 0, at each row's last key, and on both sides of every
    64-key tile, cache block and split-KV cut."""
    cuts = _cuts(implementation, TILE_SEQLEN, s_q=s_q, h_q=h_q, block_size=block_size or TILE_SEQLEN)
    positions = tile_positions(TILE_SEQLEN, s_q, block_size, cuts)
    _run(place(rng, positions, seqlen=TILE_SEQLEN, s_q=s_q, h_q=h_q, block_size=block_size, dtype=dtype), implementation)


# --- The check against a split-KV model with defects -------------------------------------


def split_kv_model(placed: Placed, cuts, *, drop_at=None, start_shift=0, shifted_cut=None, misread_block=None):
    """The kernels' computation in float64 NumPy: each part's keys (between two cuts)
    attended separately, the parts combined through their lse, out rounded to q's dtype.

    Defects: ``drop_at`` a key skipped; ``shifted_cut`` begins ``start_shift`` keys late
    (+1: a key lost) or early (-1: a key counted twice); ``misread_block`` (a block-table
    column) read through the next column's entry.
    """
    case = placed.case
    q, kv, seqlens, table = case.numpy_args()
    table = table.copy()
    if misread_block is not None:
        table[0, misread_block] = table[0, misread_block + 1]
    keys = kv[table[0]].reshape(-1, *kv.shape[2:])[:, 0].astype(np.float64)  # [capacity, d]
    seqlen, s_q = int(seqlens[0]), q.shape[1]
    scale = q.shape[-1] ** -0.5
    bounds = [0] + list(cuts) + [seqlen]
    out = np.zeros((1, s_q, q.shape[2], case.head_dim_v))
    lse = np.zeros((1, q.shape[2], s_q))
    for i in range(s_q):
        visible = seqlen - s_q + i + 1 if case.causal else seqlen
        scores_of, values_of = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            lo = lo + start_shift if lo == shifted_cut else lo
            idx = [k for k in range(lo, min(hi, visible)) if k != drop_at]
            scores_of.append(scale * q[0, i].astype(np.float64) @ keys[idx].T)  # [h, n]
            values_of.append(keys[idx, : case.head_dim_v])
        total = np.logaddexp.reduce(np.concatenate(scores_of, axis=1), axis=1)  # [h]
        out[0, i] = sum(np.exp(s - total[:, None]) @ v for s, v in zip(scores_of, values_of))
        lse[0, :, i] = total
    return jnp.asarray(out, case.dtype), jnp.asarray(lse, jnp.float32)


@pytest.fixture(scope="module")
def split_problem():
    """Rows 16 (s_q 2 x 8 heads) over 1,000 keys in 64-key blocks, cut as the ETAP kernel
    cuts them (at every tile), and the calls that cover every cut."""
    seqlen, s_q, h_q = 1000, 2, 8
    cuts = cuts_for("etap", (seqlen,), seqlen, s_q=s_q, h_q=h_q)[0]
    positions = tile_positions(seqlen, s_q, 64, cuts)
    return cuts, place(np.random.default_rng(24), positions, seqlen=seqlen, s_q=s_q, h_q=h_q)


def test_the_split_model_passes_the_check(split_problem):
    cuts, calls = split_problem
    assert cuts == list(range(64, 1000, 64))
    for placed in calls:
        check(*split_kv_model(placed, cuts), placed)


def _fails(split_problem, **defect) -> None:
    cuts, calls = split_problem
    failures = 0
    for placed in calls:
        try:
            check(*split_kv_model(placed, cuts, **defect), placed)
        except AssertionError:
            failures += 1
    assert failures >= 1, f"no call fails the check with the defect {defect}"


@pytest.mark.parametrize("key", [0, 511, 512, 999], ids=["first", "before-cut", "at-cut", "last"])
def test_the_check_catches_a_dropped_key(split_problem, key):
    _fails(split_problem, drop_at=key)


@pytest.mark.parametrize("shift", [1, -1], ids=["cut-late-key-lost", "cut-early-key-twice"])
def test_the_check_catches_a_cut_off_by_one(split_problem, shift):
    _fails(split_problem, shifted_cut=512, start_shift=shift)


def test_the_check_catches_a_misread_block(split_problem):
    _fails(split_problem, misread_block=7)


def test_the_scheduler_model_cuts():
    """The model against cuts worked out by hand from csrc/schedule.cuh."""
    # One sequence of 10 tiles (cost 12) over 4 parts: parts begin at 0, 3, 6, 9 on the
    # cost line, i.e. tiles 1, 4 and 7 of the sequence (its tiles start at unit 2).
    assert schedule_model.split_boundaries((640,), 640, 4) == {0: [64, 256, 448]}
    # Over 5 parts the line (12 units) is cut at 12 i / 5 rounded down: 2, 4, 7, 9; part 1
    # holds no tile but the sequence's first, so the cuts are at tiles 2, 5 and 7.
    assert schedule_model.split_boundaries((640,), 640, 5) == {0: [128, 320, 448]}
    # A line shorter than the parts: one unit per part, every tile its own part.
    assert schedule_model.split_boundaries((200,), 256, 132) == {0: [64, 128, 192]}
    # Two sequences, 3 and 1 tiles (cost 5 + 3 = 8), 2 parts cut at unit 4: the first
    # sequence's tiles 0-1 | 2, the second whole.
    assert schedule_model.split_boundaries((150, 10), 192, 2) == {0: [128], 1: []}
    # Parts: 132 SMs over 1 CTA per part (16 rows), 8 (portable, 128 rows), 2 (wide, 128).
    assert schedule_model.num_parts(132, rows=16, h_kv=1, kernel="etap") == 132
    assert schedule_model.num_parts(132, rows=128, h_kv=1, kernel="portable") == 16
    assert schedule_model.num_parts(132, rows=128, h_kv=1, kernel="wide") == 66
    assert schedule_model.num_parts(132, rows=48, h_kv=2, kernel="wide") == 66
