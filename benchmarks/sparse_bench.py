"""Times `mla_decode_sparse` (top-k decode, DeepSeek-V3.2) from bf16 and FP8 caches: its
CUDA path and the jnp reference, against the device's ceilings, in one process.

    python benchmarks/sparse_bench.py [--configs "b128 h16 sq1 k2048 bf16,..."] [--csv FILE]
                                      [--small-ceilings]

Run it as a script without ``-P`` (as bench.py). Each sequence holds ``CONTEXT`` tokens in
a paged cache; each query row selects ``topk`` of its own sequence's tokens, drawn
uniformly, 1 in 16 of them -1 (nothing). Rates count the bytes actually selected (topk
rows a query row, 1152 bytes each in bf16, 656 in FP8) plus q and out once, and the
FLOPs of those keys; the timing is bench.py's (timing.py: the GPU time of each call from
the profiler, the median over 32 calls, caches rotated past twice the L2; wall time in a
chained loop beside it). Every row is checked against the reference's output.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch's ceilings share the GPU

import bench  # noqa: E402 - after the allocator setting
import ceilings  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
from timing import CALLS, l2_cache_bytes, on_gpu, rotation, time_calls

import jax_etap
from jax_etap import fp8
from jax_etap.testing import random_paged_cache, to_f32

D_QK, D_V = 576, 512
CONTEXT = 32768  # tokens a sequence holds; the top-k are chosen among them
SKIPPED = 1 / 16  # fraction of index entries that are -1


@dataclass(frozen=True)
class SparseConfig:
    batch: int
    h_q: int
    s_q: int
    topk: int
    cache: str  # "bf16" or "fp8"

    @property
    def name(self) -> str:
        return f"b{self.batch} h{self.h_q} sq{self.s_q} k{self.topk} {self.cache}"

    @classmethod
    def parse(cls, name: str) -> "SparseConfig":
        """The inverse of `name`: ``"b128 h16 sq1 k2048 fp8"``."""
        match = re.fullmatch(r"b(\d+) h(\d+) sq(\d+) k(\d+) (bf16|fp8)", name.strip())
        if not match:
            raise ValueError(f"config {name!r} is not of the form 'b<batch> h<heads> sq<s_q> k<topk> bf16|fp8'")
        *sizes, cache = match.groups()
        return cls(*map(int, sizes), cache)

    def row_bytes(self) -> int:
        return fp8.BYTES_PER_TOKEN if self.cache == "fp8" else 2 * D_QK

    def bytes_moved(self) -> int:
        """The selected rows once, q and out once (bf16)."""
        rows = self.batch * self.s_q
        return rows * self.topk * self.row_bytes() + 2 * rows * self.h_q * (D_QK + D_V)

    def flops(self) -> int:
        return 2 * self.batch * self.s_q * self.h_q * self.topk * (D_QK + D_V)


# DeepSeek-V3.2 decode: all 128 heads with two query positions (MTP) from FP8; 16 heads a
# GPU under TP8 from both caches; one sequence at 16 heads (latency).
GRID = [SparseConfig(128, 128, 2, 2048, "fp8"), SparseConfig(128, 16, 1, 2048, "bf16"),
        SparseConfig(128, 16, 1, 2048, "fp8"), SparseConfig(1, 16, 1, 2048, "bf16"), SparseConfig(1, 16, 1, 2048, "fp8")]


def make_cache(cfg: SparseConfig, seed: int, context: int):
    """A random paged cache of ``context`` tokens a sequence (FP8: quantized), and indices
    [batch, s_q, topk] into its flat tokens, each row's from its own sequence."""
    key = jax.random.key(seed)
    kv, _, table = random_paged_cache(key, cfg.batch, context, block_size=64, d_qk=D_QK)
    if cfg.cache == "fp8":
        kv = fp8.quantize(kv)
    k_pos, k_skip = jax.random.split(jax.random.fold_in(key, 1))
    position = jax.random.randint(k_pos, (cfg.batch, cfg.s_q, cfg.topk), 0, context)
    token = table[jnp.arange(cfg.batch)[:, None, None], position // 64] * 64 + position % 64
    skipped = jax.random.uniform(k_skip, token.shape) < SKIPPED
    return kv, jnp.where(skipped, -1, token).astype(jnp.int32)


def make_queries(cfg: SparseConfig, count: int):
    keys = jax.random.split(jax.random.key(12345), count)
    return [jax.random.normal(k, (cfg.batch, cfg.s_q, cfg.h_q, D_QK), jnp.bfloat16) for k in keys]


def implementations(kernel: bool) -> dict[str, object]:
    def decode(implementation):
        return lambda q, kv, indices: jax_etap.mla_decode_sparse(q, kv, indices, implementation=implementation)

    return {**({"cuda": decode("cuda")} if kernel else {}), "reference": decode("xla")}


def run(grid, impls, copy_gbps: float, matmul_tflops: float, l2_bytes, context: int, after_config=None) -> list[dict]:
    gpu = on_gpu()
    ours = "cuda" if "cuda" in impls else "reference"
    rows = []
    started = time.perf_counter()
    for n, cfg in enumerate(grid):
        print(bench.progress_line(n, len(grid), cfg.name, time.perf_counter() - started), flush=True)
        caches = [make_cache(cfg, seed, context) for seed in range(rotation(cfg.bytes_moved(), l2_bytes))]
        queries = make_queries(cfg, CALLS)
        results = {}
        for name, fn in impls.items():
            timing, first = time_calls(fn, queries, caches, gpu)
            results[name] = bench.Measured(timing, to_f32(first[0]))
        rows += [bench.measured_row(cfg, name, results, ours, copy_gbps, matmul_tflops) for name in impls]
        del caches, queries
        if after_config is not None:
            after_config(rows)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help="comma-separated configs instead of the grid, e.g. 'b1 h16 sq1 k2048 bf16'")
    parser.add_argument("--context", type=int, default=CONTEXT, help=f"tokens a sequence holds (default {CONTEXT})")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--small-ceilings", action="store_true", help="tiny ceiling problems: a CPU smoke run of this script")
    args = parser.parse_args(argv)
    grid = [SparseConfig.parse(c) for c in args.configs.split(",")] if args.configs else GRID
    if args.context < 1:
        parser.error(f"--context must be positive, got {args.context}")

    gpu = on_gpu()
    found, notes = ceilings.measure("small" if args.small_ceilings else "gpu", gpu)
    l2_bytes, l2_note = l2_cache_bytes()
    for note in [*notes, l2_note] + ([] if gpu else [f"GPU time not measured: jax runs on {jax.devices()[0].platform}"]):
        print(f"note: {note}", flush=True)
    copy_gbps = found.get("torch_copy_gbps", found["xla_copy_gbps"])
    matmul_tflops = found.get("torch_matmul_tflops", found["xla_matmul_tflops"])
    impls = implementations(kernel=jax_etap.kernel_available())
    columns_of = bench.row_columns
    checkpoint = (lambda rows: bench.write_csv(args.csv, rows, columns_of(rows))) if args.csv else None
    rows = run(grid, impls, copy_gbps, matmul_tflops, l2_bytes, args.context, after_config=checkpoint)
    ceiling_text = "; ".join(f"{k} {v:.0f}" for k, v in found.items())
    bench.print_table(rows, f"device: {jax.devices()[0].device_kind}; {ceiling_text}; context {args.context}; "
                            f"GB/s of the selected rows; {'GPU' if gpu else 'wall'} time; {l2_note}", columns_of(rows))


if __name__ == "__main__":
    main()
