"""The GPU's side of a jitted program, from jax's profiler: its kernels and their span.

The benchmark's wall time of a program exceeds the span of its kernels on the device
plane by 14-40 us per call on the H200, for plain jnp as much as for the custom call
(RESULTS.md); the span is the GPU's time alone, at the card's own clocks and with the
kernels overlapping as they ran. (Under the profiler XLA may run the program's thunks
without their command buffers; the kernels are the same.)
"""

from __future__ import annotations

import glob
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


def busy_ns(kernels: list[Kernel]) -> float:
    """Length of the union of the kernels' intervals (they may overlap)."""
    total, reach = 0.0, float("-inf")
    for k in kernels:
        if k.end_ns > reach:
            total += k.end_ns - max(k.start_ns, reach)
            reach = k.end_ns
    return total


def trace_program(program, args, warm_up: bool = True) -> tuple[ProfileData, float]:
    """The profile of one run of ``program`` and its wall seconds; first an untraced
    warm-up run (compilation, autotuning), unless the caller has already run it."""
    if warm_up:
        jax.block_until_ready(program(*args))
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            start = time.perf_counter()
            jax.block_until_ready(program(*args))
            wall = time.perf_counter() - start
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        return ProfileData.from_file(path), wall
