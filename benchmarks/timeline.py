"""Where the time of one benchmarked decode call goes on the GPU, at the card's own clocks.

Runs the benchmark's chained program (``jax_etap.bench.chained_program``: 32 calls, each
waiting for the previous one) once under jax's profiler, reads the device plane of the
trace and prints per call: the span from the first kernel's start to the last kernel's end,
the time some kernel was running, the gaps between, and each kernel's median duration;
beside them the run's wall time per call (what the benchmark reports), and with --host
the runtime's busiest host events.
Unlike Nsight Compute it neither locks the clocks nor flushes the caches nor serialises
the launches, so the decode kernel and the combine overlap as they do in the benchmark.

    python -P benchmarks/timeline.py --configs "b1 s1024 h16 sq1,b128 s4096 h16 sq1" --impls etap,portable
"""

from __future__ import annotations

import argparse
import glob
import re
import statistics
import tempfile
import time
from dataclasses import dataclass

import jax
from jax._src.profiler import ProfileData

from jax_etap.bench import CALLS_PER_PROGRAM, Config, chained_program, implementations, make_cache, make_queries

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


@dataclass
class Kernel:
    name: str
    start_ns: float
    end_ns: float


def device_kernels(profile: ProfileData) -> list[Kernel]:
    """The kernels on the streams of the first GPU's plane, in start order."""
    plane = profile.find_plane_with_name("/device:GPU:0")
    if plane is None:
        raise RuntimeError("the trace has no /device:GPU:0 plane (no GPU, or the profiler saw no device activity)")
    kernels = [
        Kernel(event.name, event.start_ns, event.end_ns)
        for line in plane.lines
        if line.name.startswith("Stream")
        for event in line.events
    ]
    return sorted(kernels, key=lambda k: k.start_ns)


def busy_ns(kernels: list[Kernel]) -> float:
    """Length of the union of the kernels' intervals (they may overlap under dependent launch)."""
    total, reach = 0.0, float("-inf")
    for k in kernels:
        if k.end_ns > reach:
            total += k.end_ns - max(k.start_ns, reach)
            reach = k.end_ns
    return total


def summarize(kernels: list[Kernel], calls: int) -> dict[str, float]:
    """Per-call span, busy time and gaps (us), and each kernel kind's median duration (us)."""
    span = kernels[-1].end_ns - kernels[0].start_ns
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


def trace_program(program, args, logdir: str) -> tuple[ProfileData, float]:
    """The profile of one run of ``program`` and that run's wall time in seconds."""
    jax.block_until_ready(program(*args))  # compile and warm up outside the trace
    with jax.profiler.trace(logdir):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        wall = time.perf_counter() - start
    (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    return ProfileData.from_file(path), wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="b1 s1024 h16 sq1,b1 s65536 h16 sq1,b128 s4096 h16 sq1")
    parser.add_argument("--impls", default="etap,portable")
    parser.add_argument("--cache-sets", type=int, default=4)
    parser.add_argument("--host", action="store_true", help="also the host events with the most time")
    args = parser.parse_args(argv)
    impls = implementations(kernel=True)
    for cfg in (Config.parse(c) for c in args.configs.split(",")):
        caches = [make_cache(cfg, seed) for seed in range(args.cache_sets if cfg.bytes_moved() < 2**28 else 1)]
        queries = make_queries(cfg, CALLS_PER_PROGRAM)
        for name in args.impls.split(","):
            fn, dense = impls[name]
            if dense:
                raise SystemExit(f"--impls: {name} takes a dense cache; this script traces the paged implementations")
            with tempfile.TemporaryDirectory() as logdir:
                profile, wall = trace_program(*chained_program(fn, queries, caches), logdir)
            row = {"wall_us": wall / len(queries) * 1e6, **summarize(device_kernels(profile), len(queries))}
            if args.host:
                row.update(host_hotspots(profile, len(queries)))
            cells = ", ".join(f"{k} {v:.1f}" for k, v in row.items())
            print(f"| {cfg.name} | {name} | {cells} |", flush=True)
        del caches, queries


if __name__ == "__main__":
    main()
