"""How the benchmark times a call, the same way for every implementation of ours and of JAX.

* GPU time (the headline): each call jitted alone and dispatched alone, the GPU left idle
  for ``IDLE_S`` between calls, all under jax's profiler; a call's time is the span from
  its first kernel's start to its last kernel's end on the device plane
  (`gpu_trace.split_calls`), and a row reports the median over ``CALLS`` calls. The
  FlashMLA peer reads the same span from torch's profiler (benchmarks/peers/).
* Wall time (its own column): the calls chained in one jitted program, each query waiting
  for the previous call's result, as in a decode loop; the program's wall time over the
  calls. This is what a serving loop sees, dispatch and XLA's gaps between kernels included.
* L2: every call of a row reads a cache that at least twice the L2's bytes of other
  caches have streamed past since its last use (`rotation`), so no row is served from L2.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import jax
from gpu_trace import device_kernels, kernel_medians_us, span_ns, split_calls, trace

CALLS = 32  # per row, for the median (>= 20) and the chained program
IDLE_S = 1e-3  # the GPU idles this long between two traced calls, so they can be told apart
# Where the device's L2 size cannot be read (no torch with CUDA): the H200's and H100's
# L2 is 50-60 MB; assuming 60 MiB errs towards more caches.
ASSUMED_L2_BYTES = 60 * 2**20
CPU_CACHES = 2


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the wall time, and each call's GPU span (None where jax runs on
    no GPU), with the median microseconds of each of its kernels (`kernel_medians_us`)."""

    wall_s: float
    gpu_s: list[float] | None
    kernel_us: dict[str, float] | None = None

    @property
    def gpu_median_s(self) -> float | None:
        return None if self.gpu_s is None else statistics.median(self.gpu_s)

    @property
    def headline_s(self) -> float:
        """The GPU time where there is one, else the wall time."""
        return self.wall_s if self.gpu_s is None else self.gpu_median_s


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def l2_cache_bytes() -> tuple[int | None, str]:
    """The device's L2 size in bytes (None where jax runs on no GPU), and where the number
    came from."""
    if not on_gpu():
        return None, f"no L2 to defeat: jax runs on {jax.devices()[0].platform}; {CPU_CACHES} caches rotated a row"
    try:
        import torch
    except ImportError:
        return ASSUMED_L2_BYTES, "L2 assumed 60 MiB (torch is not installed to read the device's)"
    if not torch.cuda.is_available():
        return ASSUMED_L2_BYTES, "L2 assumed 60 MiB (torch sees no CUDA device to read it from)"
    l2 = int(torch.cuda.get_device_properties(0).L2_cache_size)
    return l2, f"L2 {l2 / 2**20:.0f} MiB (read by torch)"


def rotation(bytes_per_cache: int, l2_bytes: int | None) -> int:
    """How many distinct caches a row rotates through: enough that a cache comes back only
    after twice the L2 of other caches' bytes (one cache when it alone is twice the L2);
    without a GPU, ``CPU_CACHES``, which only exercises the rotation."""
    if l2_bytes is None:
        return CPU_CACHES
    if bytes_per_cache >= 2 * l2_bytes:
        return 1
    return -(-2 * l2_bytes // bytes_per_cache) + 1


def time_program(program, args, repeats: int = 7) -> float:
    """Median seconds of one run of a jitted ``program`` after a warm-up run."""
    jax.block_until_ready(program(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def chained_program(fn, queries, caches):
    """A jitted program of len(queries) calls of ``fn(q, *cache)``, and its arguments.

    Call i uses queries[i] and caches[i % len(caches)]. Each call's query waits for the
    previous call's result (an optimization barrier), as in a decoding loop, so XLA can
    neither merge the calls (e.g. the peers' einsums that share a cache) nor overlap them.
    """
    def program(qs, cs):
        results = []
        for i, q in enumerate(qs):
            if results:
                q, _ = jax.lax.optimization_barrier((q, results[-1]))
            results.append(fn(q, *cs[i % len(cs)]))
        return results

    return jax.jit(program), (queries, caches)


def traced_spans(call, calls: int) -> tuple[list[float], dict[str, float]]:
    """Each call's GPU seconds and its kernels' medians (`kernel_medians_us`), for ``calls``
    calls of ``call(i)``, which dispatches call i and waits for its result, run one at a
    time under the profiler with the GPU idle ``IDLE_S`` between them."""
    def run():
        for i in range(calls):
            call(i)
            time.sleep(IDLE_S)

    groups = split_calls(device_kernels(trace(run)), calls, IDLE_S * 1e9 / 2)
    return [span_ns(group) / 1e9 for group in groups], kernel_medians_us(groups)


def gpu_spans(fn, arg_sets, calls: int):
    """`traced_spans` of ``calls`` calls of jitted ``fn`` on arg_sets[i % len], and the
    first call's output. A warm-up call on the last set first (compilation), so the first
    timed set comes back cold."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*arg_sets[-1]))
    outputs = []

    def call(i):
        out = jax.block_until_ready(jitted(*arg_sets[i % len(arg_sets)]))
        if i == 0:
            outputs.append(out)

    spans, kernels = traced_spans(call, calls)
    return spans, kernels, outputs[0]


def time_calls(fn, queries, caches, gpu: bool):
    """The Timing of ``fn(q, *cache)`` over len(queries) calls (caches rotated), and the
    first call's output (queries[0] on caches[0]), for the check against ours."""
    wall = time_program(*chained_program(fn, queries, caches)) / len(queries)
    arg_sets = [(q, *caches[i % len(caches)]) for i, q in enumerate(queries)]
    if gpu:
        spans, kernels, first = gpu_spans(fn, arg_sets, len(queries))
    else:
        spans, kernels, first = None, None, jax.jit(fn)(*arg_sets[0])
    return Timing(wall, spans, kernels), first


def time_dispatched(fn, arg_sets, calls: int = 5, repeats: int = 5) -> float:
    """Median wall seconds per call of a jitted ``fn`` dispatched back to back over the
    input sets: for one large operation per call, whose time hides the dispatch."""
    jax.block_until_ready(fn(*arg_sets[0]))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = [fn(*arg_sets[i % len(arg_sets)]) for i in range(calls)]
        jax.block_until_ready(results)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)
