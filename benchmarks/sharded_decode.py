"""Time one sharded MLA decode step on 1, 2, 4, ... of the devices jax sees.

For each device count n (powers of two up to all devices) the step runs under `jax.jit`
on a mesh of n devices: query heads split over a "model" axis, the batch over a "data"
axis (``--mesh``), the latent cache replicated along "model" and, when the batch is
split, one pool slice per batch shard. Two series:

* fixed total work (strong scaling): the same batch, seqlen and 128 heads at every n;
* fixed per-device work (weak scaling): each device keeps the batch rows and heads it
  has at the largest n, so the global batch and head count grow with n.

Each row gives the time per step, "vs n=1" (the time at n = 1 over this one: ideally n
at fixed total work, 1 at fixed per-device work), the bytes each device streams per second (its cache rows,
q and out) against that device's copy ceiling, whether the compiled program holds any
collective, and the largest difference from the same step on one device (``--check``).

GPU (e.g. 8 x H200):   python benchmarks/sharded_decode.py --batch 64 256 --seqlen 4096 32768
CPU, tiny sizes:       python benchmarks/sharded_decode.py --small --host-devices 8
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

import ceilings
import jax
import jax.numpy as jnp
import numpy as np
from bench import BLOCK_SIZE, D_QK, D_V
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from timing import time_dispatched

import jax_etap
from jax_etap.testing import random_paged_cache

COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|ragged-all-to-all|collective-permute|reduce-scatter|collective-broadcast)")


@dataclass(frozen=True)
class Step:
    """One decode step's global sizes on a (data x model) mesh."""

    batch: int
    seqlen: int
    heads: int
    data: int
    model: int
    d_qk: int = D_QK
    d_v: int = D_V
    block_size: int = BLOCK_SIZE

    @property
    def devices(self) -> int:
        return self.data * self.model

    def bytes_per_device(self) -> int:
        """What each device streams (bf16): its sequences' cache once, its q and out."""
        batch, heads = self.batch // self.data, self.heads // self.model
        return 2 * (batch * self.seqlen * self.d_qk + batch * heads * (self.d_qk + self.d_v))


def mesh_shape(n: int, layout: str) -> tuple[int, int]:
    """(data, model) sizes for n devices: heads only, batch only, or 2-D (model up to 4)."""
    if layout == "heads":
        return 1, n
    if layout == "batch":
        return n, 1
    model = min(n, 4)
    return n // model, model


def make_inputs(step: Step, mesh, seed: int):
    """Random q and cache made on the devices, already laid out; sequence b's blocks lie in
    its batch shard's slice of the pool, in random order."""
    key_q, key_cache = jax.random.split(jax.random.key(seed))
    by_batch = NamedSharding(mesh, P("data"))
    kv, seqlens, table = jax.jit(
        lambda k: random_paged_cache(k, step.batch, step.seqlen, block_size=step.block_size, d_qk=step.d_qk,
                                     shards=step.data),
        out_shardings=(by_batch, by_batch, by_batch))(key_cache)
    q = jax.jit(lambda k: jax.random.normal(k, (step.batch, 1, step.heads, step.d_qk), jnp.bfloat16),
                out_shardings=NamedSharding(mesh, P("data", None, "model")))(key_q)
    return q, kv, seqlens, table


def decode_step(step: Step, implementation):
    return jax.jit(
        lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, head_dim_v=step.d_v, causal=True, implementation=implementation)
    )


def unsharded_difference(step: Step, implementation, args, out) -> float:
    """Largest |difference| of out from the same step on the first device alone. The inputs
    go through the host: device_put keeps an Explicit-mesh type even onto one device."""
    one = jax.devices()[0]
    alone = decode_step(step, implementation)(*(jax.device_put(np.asarray(x), one) for x in args))[0]
    return float(np.max(np.abs(np.asarray(out, np.float32) - np.asarray(alone, np.float32))))


def measure(step: Step, implementation, check: bool) -> dict:
    mesh = jax.make_mesh((step.data, step.model), ("data", "model"), axis_types=(AxisType.Explicit,) * 2,
                         devices=jax.devices()[: step.devices])
    fn = decode_step(step, implementation)
    with jax.set_mesh(mesh):
        args = make_inputs(step, mesh, seed=step.devices)
        hlo = fn.lower(*args).compile().as_text()
        seconds = time_dispatched(fn, [args], calls=10, repeats=5)
        out = fn(*args)[0]
    row = {"seconds": seconds, "collectives": sorted(set(COLLECTIVE.findall(hlo))) or "none"}
    if check:
        row["max_diff"] = unsharded_difference(step, implementation, args, out)
    return row


def print_row(series: str, step: Step, row: dict, baseline: float, copy_gbps: float | None) -> None:
    gbps = step.bytes_per_device() / row["seconds"] / 1e9
    vs_one = baseline / row["seconds"]
    ceiling = f"{100 * gbps / copy_gbps:5.1f}" if copy_gbps else "    -"
    diff = f"{row['max_diff']:.2e}" if "max_diff" in row else "-"
    print(f"| {series:10} | {step.devices:2} | {step.data}x{step.model} | {step.batch:4} | {step.seqlen:6} | {step.heads:4} | "
          f"{step.batch // step.data:4} | {step.heads // step.model:4} | {row['seconds'] * 1e3:9.3f} | {vs_one:5.2f} | "
          f"{gbps:7.1f} | {ceiling} | {row['collectives']} | {diff} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[128], help="global batch at fixed total work")
    parser.add_argument("--seqlen", type=int, nargs="+", default=[8192])
    parser.add_argument("--heads", type=int, default=128, help="query heads at fixed total work")
    parser.add_argument("--mesh", choices=["heads", "batch", "2d"], default="heads",
                        help="split the heads (DeepSeek's tensor parallelism), the batch, or both (model axis up to 4)")
    parser.add_argument("--implementation", choices=["default", "cuda", "xla"], default="default")
    parser.add_argument("--check", action="store_true", help="compare each step with the same step on one device")
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU): batch 8, seqlen 256, 16 heads, d 64")
    parser.add_argument("--host-devices", type=int, help="run on this many CPU host devices (sets XLA_FLAGS)")
    args = parser.parse_args(argv)
    if args.host_devices:
        # Read when jax starts its backend, which nothing above has done yet.
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.host_devices}"
        jax.config.update("jax_platforms", "cpu")
    sizes = dict(d_qk=64, d_v=64, block_size=16) if args.small else {}
    batches, seqlens, heads = ([8], [256], 16) if args.small else (args.batch, args.seqlen, args.heads)
    implementation = None if args.implementation == "default" else args.implementation

    total = len(jax.devices())
    counts = [1 << i for i in range(total.bit_length()) if 1 << i <= total]
    copy_gbps = None if jax.default_backend() == "cpu" else ceilings.xla_copy_gbps(ceilings.SIZES["gpu"][0], gpu=True)
    print(f"devices: {total} x {jax.devices()[0].device_kind}; kernel: {jax_etap.kernel_available()}; "
          f"implementation: {args.implementation}; mesh: {args.mesh}"
          + (f"; copy ceiling {copy_gbps:.0f} GB/s per device" if copy_gbps else ""))
    print("| series | n | mesh | batch | seqlen | heads | batch/dev | heads/dev | ms/step | vs n=1 | GB/s/dev | %copy "
          "| collectives | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    widest_data, widest_model = mesh_shape(counts[-1], args.mesh)
    for batch in batches:
        for seqlen in seqlens:
            baseline = None
            for n in counts:
                step = Step(batch, seqlen, heads, *mesh_shape(n, args.mesh), **sizes)
                row = measure(step, implementation, args.check)
                baseline = baseline or row["seconds"]
                print_row("total", step, row, baseline, copy_gbps)
            baseline = None
            for n in counts:
                data, model = mesh_shape(n, args.mesh)
                # Each device keeps the share it has at the largest n.
                step = Step(batch // widest_data * data, seqlen, heads // widest_model * model, data, model, **sizes)
                row = measure(step, implementation, args.check)
                baseline = baseline or row["seconds"]
                print_row("per-device", step, row, baseline, copy_gbps)


if __name__ == "__main__":
    main()
