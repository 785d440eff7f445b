"""Where a decode kernel's warps stall, per warpgroup role, from Nsight Compute's SASS page.

Reads the per-instruction CSV that ``benchmarks/launch_profile.sh`` writes (``ncu --page
source --csv --print-source sass``; plain or gzipped) and splits the kernel's code at its
``setmaxnreg`` instructions (USETMAXREG): each role of a warp-specialised kernel starts
with one, so the code before the first is the prologue, and every later stretch belongs to
one role (the consumers raise their budget with TRY_ALLOC, the producer lowers it with
DEALLOC). It prints, per stretch, its share of all stall samples and its top stall reasons.

    python benchmarks/stall_regions.py device_out/launch_profile/*.source.csv.gz
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
from dataclasses import dataclass


@dataclass
class Region:
    name: str
    samples: collections.Counter


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    """The column names and the instruction rows of an ncu source-page CSV."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    header_at = next(i for i, row in enumerate(rows) if row and row[0] == "Address")
    return rows[header_at], rows[header_at + 1 :]


def regions(header: list[str], rows: list[list[str]]) -> list[Region]:
    """Stall samples by reason, for the prologue and each setmaxnreg-delimited role."""
    source = header.index("Source")
    reasons = [(i, name) for i, name in enumerate(header) if name.startswith("stall_") and "Not Issued" not in name]
    found = [Region("prologue", collections.Counter())]
    for row in rows:
        if "USETMAXREG" in row[source]:
            kind = "producer" if "DEALLOC" in row[source] else "consumer"
            found.append(Region(f"{kind} {sum(r.name.startswith(kind) for r in found) + 1}", collections.Counter()))
        for i, name in reasons:
            found[-1].samples[name.removeprefix("stall_")] += _number(row[i])
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="ncu source-page CSVs (.csv or .csv.gz)")
    parser.add_argument("--top", type=int, default=5, help="stall reasons shown per region")
    args = parser.parse_args(argv)
    for path in args.csv:
        found = regions(*read_rows(path))
        total = sum(sum(r.samples.values()) for r in found) or 1.0
        print(f"== {path}: {total:.0f} samples")
        for region in found:
            count = sum(region.samples.values())
            top = ", ".join(f"{name} {100 * n / (count or 1):.0f}%" for name, n in region.samples.most_common(args.top))
            print(f"  {region.name:11s} {100 * count / total:5.1f}% of samples: {top}")


if __name__ == "__main__":
    main()
