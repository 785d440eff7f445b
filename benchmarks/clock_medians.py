"""Medians of the wide kernel's TSW clock lines (wide_kernel_clock.patch), stamp by stamp.

    python benchmarks/clock_medians.py TSW_FILE LABEL

A line reads "TSW cta N | wg0 NAME CYCLES ... | wg1 NAME CYCLES ...": each warpgroup's
stamps as name / value pairs after its label.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable


def parse(line: str) -> list[tuple[str, int]]:
    """The (warpgroup.stamp, cycles) pairs of one TSW line, in order."""
    stamps = []
    for part in line.split("|")[1:]:
        warpgroup, *pairs = part.split()
        stamps += [(f"{warpgroup}.{pairs[i]}", int(pairs[i + 1])) for i in range(0, len(pairs), 2)]
    return stamps


def medians(lines: Iterable[str]) -> list[tuple[str, float]]:
    """Each stamp's median over the TSW lines among `lines` (all stamped alike)."""
    parsed = [parse(line) for line in lines if line.startswith("TSW")]
    if not parsed:
        return []
    names = [name for name, _ in parsed[0]]
    return [(name, statistics.median(stamps[i][1] for stamps in parsed)) for i, name in enumerate(names)]


def main() -> None:
    path, label = sys.argv[1], sys.argv[2]
    with open(path) as f:
        lines = [line for line in f if line.startswith("TSW")]
    if not lines:
        print(f"{label}: no TSW lines")
        return
    found = medians(lines)
    print(f"{label} ({len(lines)} CTAs): " + " ".join(f"{name}={value:.0f}" for name, value in found))


if __name__ == "__main__":
    main()
