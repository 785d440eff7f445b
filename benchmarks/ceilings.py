"""The device's ceilings, measured in the benchmark's own process: a device-to-device copy
and a bf16 matrix product, by XLA always and by torch where benchmarks/peers/
torch_ceilings.py and torch can run (the copy ceiling FlashMLA's figures are read against).

On a GPU, XLA's are timed like the decode calls (median GPU span of a call); elsewhere by
wall time, and then only the script's plumbing is being exercised.
"""

from __future__ import annotations

import importlib
import statistics

import jax
import jax.numpy as jnp
from timing import gpu_spans, time_dispatched

# The problems: a 2 GiB copy and an 8192^3 product on the GPU; tiny ones for a smoke run of
# the scripts on a CPU (`--small-ceilings`), whose ratios mean nothing.
SIZES = {"gpu": (2.0, 8192), "small": (1 / 64, 256)}
CALLS = 20


def _seconds(fn, arg_sets, gpu: bool) -> float:
    if gpu:
        spans, _, _ = gpu_spans(fn, arg_sets, CALLS)
        return statistics.median(spans)
    return time_dispatched(jax.jit(fn), arg_sets)


def xla_copy_gbps(gib: float, gpu: bool) -> float:
    """Bandwidth of an elementwise pass over a large int32 array (read + write)."""
    x = jnp.arange(int(gib * 2**30) // 4, dtype=jnp.int32)
    return 2 * x.nbytes / _seconds(lambda a: a + 1, [(x,)], gpu) / 1e9


def xla_matmul_tflops(n: int, gpu: bool) -> float:
    """bf16 matrix product rate on random data, over 4 distinct operand pairs."""
    keys = jax.random.split(jax.random.key(0), 8)
    mats = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]
    return 2 * n**3 / _seconds(jnp.matmul, list(zip(mats[::2], mats[1::2])), gpu) / 1e12


def torch_ceilings() -> tuple[dict[str, float], str]:
    """{"torch_copy_gbps", "torch_matmul_tflops"} from benchmarks/peers/torch_ceilings.py,
    or {} and why not."""
    try:
        module = importlib.import_module("peers.torch_ceilings")
    except ModuleNotFoundError as error:
        return {}, f"torch ceilings not measured: {error}"
    return {"torch_copy_gbps": module.copy_gbps(), "torch_matmul_tflops": module.matmul_tflops()}, "torch ceilings measured"


def measure(size: str, gpu: bool) -> tuple[dict[str, float], list[str]]:
    """Every ceiling that can be measured here, and a note for each one that cannot."""
    copy_gib, matmul_n = SIZES[size]
    found = {"xla_copy_gbps": xla_copy_gbps(copy_gib, gpu), "xla_matmul_tflops": xla_matmul_tflops(matmul_n, gpu)}
    notes = [] if gpu else ["XLA ceilings by wall time: jax runs on no GPU here"]
    if gpu:
        torch_found, note = torch_ceilings()
        found.update(torch_found)
        if not torch_found:
            notes.append(note)
    else:
        notes.append("torch ceilings not measured: they time a CUDA device, and jax runs on no GPU here")
    return found, notes
