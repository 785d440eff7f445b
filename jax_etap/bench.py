"""Times `mla_decode` against the JAX peers and the device's ceilings, in one run.

``python -m jax_etap.bench`` (or ``benchmarks/bench_decode.py``) prints one row per
(config, implementation): time, achieved GB/s and TFLOP/s, their fractions of the copy
and matmul ceilings measured in the same run, and the speedup over each peer.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jax_etap

BLOCK_SIZE = 64
D_QK, D_V = 576, 512


@dataclass(frozen=True)
class Config:
    batch: int
    seqlen: int
    h_q: int
    s_q: int

    @property
    def name(self) -> str:
        return f"b{self.batch} s{self.seqlen} h{self.h_q} sq{self.s_q}"

    def bytes_moved(self) -> int:
        """FlashMLA's count: every KV token read once, q read and out written once (bf16)."""
        return 2 * (self.batch * self.seqlen * D_QK + self.batch * self.s_q * self.h_q * (D_QK + D_V))

    def flops(self) -> int:
        return 2 * self.batch * self.seqlen * self.h_q * self.s_q * (D_QK + D_V)


# The grid of the ETAP issue: memory-bound rows at 16-64 heads, compute-bound rows at 128
# heads or s_q = 2, batch 1 for split-KV, and a latency row.
FULL_GRID = [
    Config(128, 4096, 16, 1), Config(128, 8192, 16, 1), Config(128, 16384, 16, 1), Config(16, 65536, 16, 1),
    Config(128, 8192, 32, 1), Config(128, 8192, 64, 1), Config(128, 8192, 128, 1), Config(128, 8192, 64, 2),
    Config(128, 8192, 128, 2), Config(1, 65536, 16, 1), Config(1, 131072, 128, 1), Config(1, 1024, 16, 1),
]
QUICK_GRID = [Config(128, 4096, 16, 1), Config(16, 65536, 16, 1), Config(128, 8192, 128, 1), Config(1, 65536, 16, 1),
              Config(1, 1024, 16, 1)]


def time_call(fn, arg_sets, repeats: int = 7, calls_per_repeat: int = 10) -> float:
    """Median seconds per call of a jitted ``fn``: warm up, then rotate over input sets.

    Calls are dispatched back to back and synchronised once per repeat, so the time is the
    device's, not the host's dispatch, wherever a call takes longer than dispatching it.
    """
    jax.block_until_ready(fn(*arg_sets[0]))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls_per_repeat):
            result = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / calls_per_repeat)
    return statistics.median(samples)


def copy_ceiling_gbps(gib: float = 2.0) -> float:
    """Device-to-device bandwidth of an elementwise pass over a large array (read + write)."""
    x = jnp.arange(int(gib * 2**30) // 4, dtype=jnp.int32)
    seconds = time_call(jax.jit(lambda a: a + 1), [(x,)], repeats=5, calls_per_repeat=5)
    return 2 * x.nbytes / seconds / 1e9


def matmul_ceiling_tflops(n: int = 8192) -> float:
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.bfloat16)
    b = jax.random.normal(key_b, (n, n), jnp.bfloat16)
    seconds = time_call(jax.jit(jnp.matmul), [(a, b)], repeats=5, calls_per_repeat=5)
    return 2 * n**3 / seconds / 1e12


def make_inputs(cfg: Config, seed: int):
    """Random bf16 q and a paged cache whose blocks are shuffled over the pool."""
    rng = np.random.default_rng(seed)
    blocks_per_seq = -(-cfg.seqlen // BLOCK_SIZE)
    num_blocks = cfg.batch * blocks_per_seq
    key_q, key_kv = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(key_q, (cfg.batch, cfg.s_q, cfg.h_q, D_QK), jnp.bfloat16)
    kv = jax.random.normal(key_kv, (num_blocks, BLOCK_SIZE, 1, D_QK), jnp.bfloat16)
    table = jnp.asarray(rng.permutation(num_blocks).reshape(cfg.batch, blocks_per_seq), jnp.int32)
    seqlens = jnp.full((cfg.batch,), cfg.seqlen, jnp.int32)
    return q, kv, seqlens, table


def plain_jnp_decode(q, kv_dense):
    """What a JAX user writes today: einsum, softmax, einsum on a dense cache, no mask."""
    scores = jnp.einsum("bshd,bkd->bhsk", q, kv_dense) * D_QK**-0.5
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhsk,bkd->bshd", probs, kv_dense[..., :D_V])


def implementations(kernel: bool) -> dict:
    """name -> jittable function. plain_jnp takes (q, dense cache); the others mla_decode's args."""
    impls = {
        "reference": lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, causal=True, implementation="xla"),
        "plain_jnp": plain_jnp_decode,
    }
    if kernel:
        impls["etap"] = lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, causal=True, implementation="etap")
        # The foundation kernel (sm_80 mma.sync), beside it on the same GPU.
        impls["portable"] = lambda q, kv, s, t: jax_etap.mla_decode(
            q, kv, s, t, causal=True, implementation="portable"
        )
    return impls


def run(grid, impls, input_sets: int):
    copy_gbps, matmul_tflops = copy_ceiling_gbps(), matmul_ceiling_tflops()
    rows = []
    for n, cfg in enumerate(grid):
        print(f"[{n + 1}/{len(grid)}] {cfg.name}", flush=True)
        # Rotate over enough caches to defeat the 50 MB L2 on small configs.
        sets = [make_inputs(cfg, seed) for seed in range(input_sets if cfg.bytes_moved() < 2**28 else 1)]
        times = {}
        for name, fn in impls.items():
            if fn is plain_jnp_decode:  # its peer's favourable layout: one dense cache per batch
                dense = [(q, kv[t].reshape(cfg.batch, -1, D_QK)) for q, kv, _, t in sets]
                times[name] = time_call(jax.jit(fn), dense)
                del dense
            else:
                times[name] = time_call(jax.jit(fn), sets)
        for name, seconds in times.items():
            gbps = cfg.bytes_moved() / seconds / 1e9
            tflops = cfg.flops() / seconds / 1e12
            rows.append({
                "config": cfg.name, "impl": name, "time_us": seconds * 1e6,
                "GB/s": gbps, "%copy": 100 * gbps / copy_gbps, "TFLOP/s": tflops, "%matmul": 100 * tflops / matmul_tflops,
                **{f"x_{peer}": times[peer] / seconds for peer in times if peer != name},
            })
        del sets
    return rows, copy_gbps, matmul_tflops


def print_table(rows, copy_gbps: float, matmul_tflops: float) -> None:
    peers = sorted({k for r in rows for k in r if k.startswith("x_")})
    header = ["config", "impl", "time_us", "GB/s", "%copy", "TFLOP/s", "%matmul", *peers]
    print(f"\ndevice: {jax.devices()[0].device_kind}; copy ceiling {copy_gbps:.0f} GB/s; "
          f"bf16 matmul ceiling {matmul_tflops:.0f} TFLOP/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["config"], r["impl"]] + [
            f"{r[k]:.2f}" if k.startswith("x_") and k in r else ("" if k not in r else f"{r[k]:.1f}") for k in header[2:]
        ]
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short grid (the foundation's check)")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--input-sets", type=int, default=4, help="input sets rotated on configs under 256 MB")
    args = parser.parse_args(argv)

    impls = implementations(kernel=jax_etap.kernel_available())
    rows, copy_gbps, matmul_tflops = run(QUICK_GRID if args.quick else FULL_GRID, impls, args.input_sets)
    if args.csv:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("config", "impl"), k))
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    print_table(rows, copy_gbps, matmul_tflops)


if __name__ == "__main__":
    main()
