"""The GPU's side of jitted calls, from jax's profiler: their kernels and their spans.

A call's wall time exceeds the span of its kernels on the device plane by 14-40 us on
the H200 (2026-12-01, 272a4c2), for plain jnp as much as for the custom call; the span is
the GPU's time alone, at the card's own clocks and with the kernels overlapping as they
ran. (Under the profiler XLA may run a program's thunks without their command buffers;
the kernels are the same.)
"""

from __future__ import annotations

import glob
import re
import statistics
import tempfile
import time
from dataclasses import dataclass

import jax
from jax._src.profiler import ProfileData


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


def span_ns(kernels: list[Kernel]) -> float:
    """From the first kernel's start to the last kernel's end."""
    return max(k.end_ns for k in kernels) - kernels[0].start_ns


def short_name(kernel_name: str) -> str:
    """A kernel's name without its template arguments, parameters or return type:
    ``void ns::decode_sm90_kernel<bf16, 16>(...)`` -> ``decode_sm90_kernel``."""
    head = re.split(r"[<(]", kernel_name.replace("(anonymous namespace)", ""), maxsplit=1)[0].split()
    return (head[-1].split("::")[-1] if head else "") or kernel_name


def kernel_medians_us(calls: list[list[Kernel]]) -> dict[str, float]:
    """Per kernel (by `short_name`), the median over the calls of its microseconds in a call
    (summed where it runs more than once; 0 in a call without it), in order of first start:
    where a call's span goes."""
    names = list(dict.fromkeys(short_name(k.name) for group in calls for k in group))
    per_call = []
    for group in calls:
        total = dict.fromkeys(names, 0.0)
        for k in group:
            total[short_name(k.name)] += (k.end_ns - k.start_ns) / 1e3
        per_call.append(total)
    return {name: statistics.median(t[name] for t in per_call) for name in names}


def busy_ns(kernels: list[Kernel]) -> float:
    """Length of the union of the kernels' intervals (they may overlap)."""
    total, reach = 0.0, float("-inf")
    for k in kernels:
        if k.end_ns > reach:
            total += k.end_ns - max(k.start_ns, reach)
            reach = k.end_ns
    return total


def split_calls(kernels: list[Kernel], calls: int, idle_ns: float) -> list[list[Kernel]]:
    """The kernels of ``calls`` calls that ran one after another with the GPU idle for at
    least ``idle_ns`` between them, one list a call: a call begins at a kernel that starts
    ``idle_ns`` or more after every earlier kernel ended. Raises if the groups are not
    ``calls`` (a call's own kernels apart by that much, or a call with no kernel), so a
    wrong grouping never becomes a time."""
    groups: list[list[Kernel]] = []
    reach = float("-inf")
    for k in kernels:
        if k.start_ns - reach >= idle_ns:
            groups.append([])
        groups[-1].append(k)
        reach = max(reach, k.end_ns)
    if len(groups) != calls:
        raise RuntimeError(f"the trace's kernels fall into {len(groups)} groups apart by {idle_ns / 1e3:.0f} us idle, "
                           f"for {calls} calls: cannot tell the calls apart")
    return groups


def trace(run) -> ProfileData:
    """The profile of ``run()``, called under jax's profiler."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            run()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        return ProfileData.from_file(path)


def trace_program(program, args, warm_up: bool = True) -> tuple[ProfileData, float]:
    """The profile of one run of ``program`` and its wall seconds; first an untraced
    warm-up run (compilation, autotuning), unless the caller has already run it."""
    if warm_up:
        jax.block_until_ready(program(*args))
    wall = []

    def run():
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        wall.append(time.perf_counter() - start)

    return trace(run), wall[0]
