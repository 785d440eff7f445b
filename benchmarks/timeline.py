"""Where the time of one benchmarked decode call goes on the GPU, at the card's own clocks.

Runs the benchmark's chained program (``timing.chained_program``: 32 calls, each
waiting for the previous one) once under jax's profiler, reads the device plane of the
trace and prints per call: the span from the first kernel's start to the last kernel's end,
the time some kernel was running, the gaps between, and each kernel's median duration;
beside them the run's wall time per call (what the benchmark reports), and with --host
the runtime's busiest host events.
Unlike Nsight Compute it neither locks the clocks nor flushes the caches nor serialises
the launches, so the decode kernel and the combine overlap as they do in the benchmark.

    python benchmarks/timeline.py --configs "b1 s1024 h16 sq1,b128 s4096 h16 sq1" --impls cuda,portable
"""

from __future__ import annotations

import argparse
import re
import statistics

from bench import Config, implementations, make_cache, make_queries
from gpu_trace import Kernel, busy_ns, device_kernels, span_ns, trace_program
from jax._src.profiler import ProfileData
from timing import CALLS, chained_program

# Kernel names, mangled or not, mapped to the short names of the table.
KERNEL_KINDS = (
    ("decode_sm90_wide", "wide decode"), ("decode_sm90", "etap decode"), ("decode_sm80", "portable decode"),
    ("combine_splits", "combine"),
)


def kernel_kind(name: str) -> str:
    for pattern, kind in KERNEL_KINDS:
        if pattern in name:
            return kind
    return "other: " + re.sub(r"\W+", "_", name)[:40]


def summarize(kernels: list[Kernel], calls: int) -> dict[str, float]:
    """Per-call span, busy time and gaps (us), and each kernel kind's median duration (us)."""
    span = span_ns(kernels)
    busy = busy_ns(kernels)
    row = {"span_us": span / calls / 1e3, "busy_us": busy / calls / 1e3, "gaps_us": (span - busy) / calls / 1e3}
    durations: dict[str, list[float]] = {}
    for k in kernels:
        durations.setdefault(kernel_kind(k.name), []).append((k.end_ns - k.start_ns) / 1e3)
    for kind, values in sorted(durations.items()):
        row[f"{kind} (x{len(values) / calls:g})"] = statistics.median(values)
    return row


def host_hotspots(profile: ProfileData, calls: int, top: int = 10) -> dict[str, float]:
    """The runtime's host events (jax's, XLA's, CUDA's) with the most total time, in us per call."""
    plane = profile.find_plane_with_name("/host:CPU")
    totals: dict[str, float] = {}
    for line in plane.lines if plane is not None else ():
        for event in line.events:
            if event.name.startswith("$"):  # Python frames: the profiler's own and this script's
                continue
            totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns
    hottest = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return {f"host {name[:48]}": ns / calls / 1e3 for name, ns in hottest}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="b1 s1024 h16 sq1,b1 s65536 h16 sq1,b128 s4096 h16 sq1")
    parser.add_argument("--impls", default="cuda,portable")
    parser.add_argument("--cache-sets", type=int, default=4)
    parser.add_argument("--host", action="store_true", help="also the host events with the most time")
    args = parser.parse_args(argv)
    impls = implementations(kernel=True)
    for cfg in (Config.parse(c) for c in args.configs.split(",")):
        caches = [make_cache(cfg, seed) for seed in range(args.cache_sets if cfg.bytes_moved() < 2**28 else 1)]
        queries = make_queries(cfg, CALLS)
        for name in args.impls.split(","):
            if impls[name].dense:
                raise SystemExit(f"--impls: {name} takes a dense cache; this script traces the paged implementations")
            profile, wall = trace_program(*chained_program(impls[name].fn, queries, caches))
            row = {"wall_us": wall / len(queries) * 1e6, **summarize(device_kernels(profile), len(queries))}
            if args.host:
                row.update(host_hotspots(profile, len(queries)))
            cells = ", ".join(f"{k} {v:.1f}" for k, v in row.items())
            print(f"| {cfg.name} | {name} | {cells} |", flush=True)
        del caches, queries


if __name__ == "__main__":
    main()
