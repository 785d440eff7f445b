"""A Python model of the kernels' split-KV schedule, to place test keys where it cuts.

The CUDA kernels cut the keys of the batch into parts, one per persistent CTA group
(csrc/schedule.cuh). A kernel that loses, duplicates or misreads a key does so at a cut:
between two 64-key tiles, or between two parts of a split sequence. The tests place a
dominant key on both sides of every such cut; this module computes where the cuts fall,
with the same integer arithmetic as the C++ (each function names the lines it mirrors).
Keep it in step with csrc/common/schedule.cuh, csrc/common/launch_plan.h and the kernels'
row counts in csrc/sm80/decode_portable.cu and csrc/sm90/.
"""

from __future__ import annotations

import dataclasses

from jax_etap._ffi import MAX_SCHEDULE_PARTS, choose_kernel

TILE_KEYS = 64  # common/schedule.cuh: kTileKeys
SEQUENCE_OVERHEAD = 2  # common/schedule.cuh: kSequenceOverhead
# The workspace has batch + this many slots, so plan_parts never makes more parts than
# this. Also the H100's and H200's SM count.
MAX_PARTS = MAX_SCHEDULE_PARTS
# Query rows one CTA of each kernel handles (their kRows / kN); the ETAP kernel takes 16
# rows up to 16, else 32 (sm90/decode_etap.cu, launch_for_rows).
ROWS_PER_CTA = {"portable": 16, "wide": 64}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def kernel_for(implementation: str, *, capability: tuple[int, int], d_qk: int, head_dim_v: int, rows: int,
               block_size: int) -> str:
    """The kernel ('etap', 'wide' or 'portable') that runs the call: the extension's own
    choice (csrc/dispatch.cc), not a copy of it."""
    return choose_kernel(capability, d_qk, head_dim_v, rows, block_size, 1, implementation == "portable")


def rows_per_cta(rows: int, kernel: str) -> int:
    if kernel == "etap":
        return 16 if rows <= 16 else 32
    return ROWS_PER_CTA[kernel]


def num_parts(sms: int, *, rows: int, h_kv: int, kernel: str) -> int:
    """schedule.cuh, plan_parts, with ctas_per_part = h_kv * ceil(rows / kRows)
    (sm90_pipeline.cuh, launch_pipeline_kernel; decode_sm80.cu, launch_decode_sm80)."""
    ctas_per_part = h_kv * _ceil_div(rows, rows_per_cta(rows, kernel))
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
