"""A Python model of the kernels' split-KV schedule, to place test keys where it cuts.

The CUDA kernels cut the keys of the batch into parts, one per persistent CTA group
(csrc/schedule.cuh). A kernel that loses, duplicates or misreads a key does so at a cut:
between two 64-key tiles, or between two parts of a split sequence. The tests place a
dominant key on both sides of every such cut; this module computes where the cuts fall,
with the same integer arithmetic as the C++ (each function names the lines it mirrors).
Keep it in step with csrc/schedule.cuh, csrc/sm90_pipeline.cuh, csrc/decode_sm80.cu and
csrc/decode_sm90.cu.
"""

from __future__ import annotations

import dataclasses

from jax_etap._ffi import MAX_SCHEDULE_PARTS

TILE_KEYS = 64  # schedule.cuh: kTileKeys
SEQUENCE_OVERHEAD = 2  # schedule.cuh: kSequenceOverhead
# The workspace has batch + this many slots, so plan_parts never makes more parts than
# this. Also the H100's and H200's SM count.
MAX_PARTS = MAX_SCHEDULE_PARTS
ETAP_MAX_ROWS = 32  # decode_sm90.cu: kEtapMaxRows (more rows: the wide kernel)
ETAP_VALUE_DIM = 512  # sm90::kValueDim
MAX_HEAD_DIM = 576  # mla_decode.h: kMaxHeadDim


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def runs_etap(implementation: str, *, d_qk: int, head_dim_v: int, block_size: int, hopper: bool) -> bool:
    """Whether the Hopper (ETAP or wide) kernel runs rather than the portable one.

    ffi_handlers.cc: ``etap = hopper && !portable && decode_sm90_supports(p)``;
    decode_sm90.cu, decode_sm90_supports: d_v 512, d_qk 512 or 576, block sizes that
    tile 64 keys (a multiple of 64, or a divisor of 64 of at least 8).
    """
    blocks_tile = block_size % TILE_KEYS == 0 or (TILE_KEYS % block_size == 0 and block_size >= 8)
    return (
        hopper
        and implementation != "portable"
        and head_dim_v == ETAP_VALUE_DIM
        and d_qk in (ETAP_VALUE_DIM, MAX_HEAD_DIM)
        and blocks_tile
    )


def rows_per_cta(rows: int, etap: bool) -> int:
    """Query rows one CTA handles (its kRows / kN).

    decode_sm80.cu: kRows = 16; decode_sm90.cu, launch_for_rows: 16 if rows <= 16 else 32,
    and launch_decode_sm90: the wide kernel (decode_sm90_wide.cu, kRows = 64) above
    kEtapMaxRows = 32.
    """
    if not etap:
        return 16
    if rows > ETAP_MAX_ROWS:
        return 64
    return 16 if rows <= 16 else 32


def num_parts(sms: int, *, rows: int, h_kv: int, etap: bool) -> int:
    """schedule.cuh, plan_parts, with ctas_per_part = h_kv * ceil(rows / kRows)
    (sm90_pipeline.cuh, launch_pipeline_kernel; decode_sm80.cu, launch_decode_sm80)."""
    ctas_per_part = h_kv * _ceil_div(rows, rows_per_cta(rows, etap))
    parts = sms // ctas_per_part
    return 1 if parts < 1 else min(parts, MAX_PARTS)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Tiles [tile_begin, tile_end) of sequence b, computed by one part."""

    part: int
    b: int
    tile_begin: int
    tile_end: int


def pieces(seqlens, capacity: int, parts: int) -> list[Piece]:
    """Every piece of every part, in order.

    schedule.cuh: sequence_tiles / sequence_cost (a sequence costs kSequenceOverhead + its
    tiles of clamped length), CostLine::measure and part_begin (``used_parts`` =
    min(num_parts, total); part i begins at min(i, used) * total / used), and
    PartPieces::next (a part's pieces are the tile ranges of the sequences whose cost
    interval meets the part's, pieces with no tile skipped).
    """
    tiles = [_ceil_div(min(max(int(n), 0), capacity), TILE_KEYS) for n in seqlens]
    total = sum(SEQUENCE_OVERHEAD + t for t in tiles)
    if total == 0:
        return []
    used = min(parts, total)

    def part_begin(i: int) -> int:
        return min(i, used) * total // used

    found = []
    for part in range(parts):
        begin, end = part_begin(part), part_begin(part + 1)
        start = 0
        for b, t in enumerate(tiles):
            first_tile = start + SEQUENCE_OVERHEAD
            lo, hi = max(first_tile, begin), min(first_tile + t, end)
            if hi > lo:
                found.append(Piece(part, b, lo - first_tile, hi - first_tile))
            start += SEQUENCE_OVERHEAD + t
    return found


def split_boundaries(seqlens, capacity: int, parts: int) -> dict[int, list[int]]:
    """Per sequence, the keys at which a part other than the first begins (sorted)."""
    cuts: dict[int, list[int]] = {b: [] for b in range(len(seqlens))}
    for piece in pieces(seqlens, capacity, parts):
        if piece.tile_begin > 0:
            cuts[piece.b].append(piece.tile_begin * TILE_KEYS)
    return {b: sorted(c) for b, c in cuts.items()}
