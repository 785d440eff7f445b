"""Times `mla_decode` against the JAX peers and the device's ceilings, in one run.

``python -m jax_etap.bench`` (or ``benchmarks/bench_decode.py``) prints one row per
(config, implementation): time, achieved GB/s and TFLOP/s, their fractions of the copy
and matmul ceilings measured in the same run, and the speedup over each peer.
``--quick`` takes a short grid, ``--configs "b1 s1024 h16 sq1,..."`` and ``--impls
etap,plain_jnp`` pick configs and implementations, ``--csv FILE`` writes the rows, and
``--gpu-time`` adds each call's GPU time alone (``gpu_us``, from a profiler trace: the
wall time per call is 14-40 us longer for every implementation, plain jnp included).
tokamax's attention kernels join as peers when tokamax is installed
(``benchmarks/peer_wheels.sh`` fetches its wheels for the device); a peer that fails on a
config (because of its shape, or of the jax it runs on) is reported as refused, with its
error, instead of ending the run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import re
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jax_etap
from jax_etap._gpu_trace import device_kernels, span_ns, trace_program

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

    @classmethod
    def parse(cls, name: str) -> "Config":
        """The inverse of `name`: ``"b128 s4096 h16 sq1"`` -> Config(128, 4096, 16, 1)."""
        match = re.fullmatch(r"b(\d+) s(\d+) h(\d+) sq(\d+)", name.strip())
        if not match:
            raise ValueError(f"config {name!r} is not of the form 'b<batch> s<seqlen> h<heads> sq<s_q>'")
        return cls(*map(int, match.groups()))

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


# Calls per timed program: each timing runs one jitted program of this many decode calls
# (on distinct queries, so XLA cannot merge them), which amortises jax's ~50-60 us
# dispatch of a program to under 2 us per call. A decode step of a jitted serving loop
# sees the same: launches back to back, no host in between.
CALLS_PER_PROGRAM = 32


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

    Call i uses queries[i] and caches[i % len(caches)]: rotating caches keeps the small
    configs from being served out of the 50 MB L2. Each call's query waits for the
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


def time_calls(fn, queries, caches, gpu_time: bool = False) -> tuple[float, float | None]:
    """Seconds per call of ``fn(q, *cache)`` over the chained program of len(queries) calls:
    the wall time, and with ``gpu_time`` the GPU's alone (the span of the program's kernels
    in one traced run; the wall time is longer, for every implementation alike)."""
    program, args = chained_program(fn, queries, caches)
    wall = time_program(program, args) / len(queries)
    if not gpu_time:
        return wall, None
    profile, _ = trace_program(program, args, warm_up=False)  # time_program ran it
    return wall, span_ns(device_kernels(profile)) / 1e9 / len(queries)


def time_dispatched(fn, arg_sets, calls: int = 5, repeats: int = 5) -> float:
    """Median seconds per call of a jitted ``fn`` dispatched back to back over the input sets.

    For the ceilings: one large operation per call, whose time hides the dispatch.
    """
    jax.block_until_ready(fn(*arg_sets[0]))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = [fn(*arg_sets[i % len(arg_sets)]) for i in range(calls)]
        jax.block_until_ready(results)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def copy_ceiling_gbps(gib: float) -> float:
    """Device-to-device bandwidth of an elementwise pass over a large array (read + write)."""
    x = jnp.arange(int(gib * 2**30) // 4, dtype=jnp.int32)
    seconds = time_dispatched(jax.jit(lambda a: a + 1), [(x,)])
    return 2 * x.nbytes / seconds / 1e9


def matmul_ceiling_tflops(n: int) -> float:
    """bf16 matrix product rate on random data, over 4 distinct operand pairs."""
    keys = jax.random.split(jax.random.key(0), 8)
    mats = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]
    seconds = time_dispatched(jax.jit(jnp.matmul), list(zip(mats[::2], mats[1::2])))
    return 2 * n**3 / seconds / 1e12


def make_cache(cfg: Config, seed: int):
    """A random bf16 paged cache whose blocks are shuffled over the pool, full lengths."""
    rng = np.random.default_rng(seed)
    blocks_per_seq = -(-cfg.seqlen // BLOCK_SIZE)
    num_blocks = cfg.batch * blocks_per_seq
    kv = jax.random.normal(jax.random.key(seed), (num_blocks, BLOCK_SIZE, 1, D_QK), jnp.bfloat16)
    table = jnp.asarray(rng.permutation(num_blocks).reshape(cfg.batch, blocks_per_seq), jnp.int32)
    seqlens = jnp.full((cfg.batch,), cfg.seqlen, jnp.int32)
    return kv, seqlens, table


def make_queries(cfg: Config, count: int):
    keys = jax.random.split(jax.random.key(12345), count)
    return [jax.random.normal(k, (cfg.batch, cfg.s_q, cfg.h_q, D_QK), jnp.bfloat16) for k in keys]


def dense_cache(kv, table):
    """The paged cache laid out densely, [batch, seqlen, 576]: the peers' favourable layout."""
    return kv[table].reshape(table.shape[0], -1, D_QK)


def plain_jnp_decode(q, kv_dense):
    """What a JAX user writes today: einsum, softmax, einsum on a dense cache, no mask."""
    scores = jnp.einsum("bshd,bkd->bhsk", q, kv_dense) * D_QK**-0.5
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhsk,bkd->bshd", probs, kv_dense[..., :D_V])


def xla_attention_decode(q, kv_dense):
    """jax.nn.dot_product_attention (XLA) with the 576-wide cache as K and V, sliced to 512."""
    kv = kv_dense[:, :, None, :]
    return jax.nn.dot_product_attention(q, kv, kv, implementation="xla")[..., :D_V]


def tokamax_decode(implementation: str):
    """tokamax.dot_product_attention with K the 576-wide cache and V its first 512 channels
    (tokamax takes a V head dim of its own), heads folded over the one KV head, no mask
    (like the other dense peers)."""
    import tokamax
    from absl import flags

    # tokamax reads its options through absl flags, parsing sys.argv at first use, where
    # this script's own arguments are unknown flags to absl: take tokamax's defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    def decode(q, kv_dense):
        k = kv_dense[:, :, None, :]
        return tokamax.dot_product_attention(q, k, k[..., :D_V], implementation=implementation)

    return decode


@dataclass(frozen=True)
class Impl:
    fn: object
    dense: bool  # takes the dense cache instead of mla_decode's paged arguments
    may_refuse: bool = False  # a third-party peer whose refusal of a shape is a result, not a bug


def implementations(kernel: bool) -> dict[str, Impl]:
    """name -> Impl of every implementation that can run here."""
    def decode(implementation):
        return lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, causal=True, implementation=implementation)

    impls = {
        "reference": Impl(decode("xla"), dense=False),
        "plain_jnp": Impl(plain_jnp_decode, dense=True),
        "dot_product_attention": Impl(xla_attention_decode, dense=True),
    }
    if kernel:
        impls["etap"] = Impl(decode("etap"), dense=False)
        impls["portable"] = Impl(decode("portable"), dense=False)  # the foundation kernel, on the same GPU
    if importlib.util.find_spec("tokamax") is not None:
        for backend in ("triton", "mosaic", "xla"):
            impls[f"tokamax_{backend}"] = Impl(tokamax_decode(backend), dense=True, may_refuse=True)
    return impls


def refusal(error: Exception) -> str:
    """An exception as one line of a table: its type and the first line of its message."""
    first_line = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first_line[:160]}"


# The ceilings' problem sizes: a 2 GiB copy and an 8192^3 product on the GPU; tiny ones for
# a smoke run of the script on a CPU (`--small-ceilings`), whose ratios mean nothing.
CEILINGS = {"gpu": (2.0, 8192), "small": (1 / 64, 256)}


def measured_row(cfg: Config, name: str, times: dict, gpu_seconds: float | None, copy_gbps: float,
                 matmul_tflops: float) -> dict:
    """One implementation's row: its rates, their fractions of the ceilings, and the
    speedup over each peer timed in the same run (the peer's time over this one's)."""
    seconds = times[name]
    gbps = cfg.bytes_moved() / seconds / 1e9
    tflops = cfg.flops() / seconds / 1e12
    row = {
        "config": cfg.name, "impl": name, "time_us": seconds * 1e6,
        "GB/s": gbps, "%copy": 100 * gbps / copy_gbps, "TFLOP/s": tflops, "%matmul": 100 * tflops / matmul_tflops,
        **{f"x_{peer}": times[peer] / seconds for peer in times if peer != name},
    }
    if gpu_seconds is not None:
        row["gpu_us"] = gpu_seconds * 1e6
        row["gpu_%copy"] = 100 * cfg.bytes_moved() / gpu_seconds / 1e9 / copy_gbps
    return row


def write_csv(path: str, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("config", "impl"), k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def progress_line(done: int, total: int, label: str, elapsed_s: float, width: int = 24) -> str:
    """``[####--------------------] 3/12 b128 s16384 h16 sq1 (41 s)``: the bar fills with the
    configs done, the count names the one starting. A line a config: a log file keeps it,
    where a redrawn bar would not read."""
    filled = round(width * done / total)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done + 1}/{total} {label} ({elapsed_s:.0f} s)"


def run(grid, impls, cache_sets: int, ceilings: str = "gpu", gpu_time: bool = False, after_config=None):
    """Times every implementation on every config of ``grid``; ``after_config(rows)`` is
    called with the rows so far after each config (the CSV is rewritten there, so a run cut
    short by a time limit keeps what it measured)."""
    copy_gib, matmul_n = CEILINGS[ceilings]
    copy_gbps, matmul_tflops = copy_ceiling_gbps(copy_gib), matmul_ceiling_tflops(matmul_n)
    rows = []
    started = time.perf_counter()
    for n, cfg in enumerate(grid):
        print(progress_line(n, len(grid), cfg.name, time.perf_counter() - started), flush=True)
        caches = [make_cache(cfg, seed) for seed in range(cache_sets if cfg.bytes_moved() < 2**28 else 1)]
        queries = make_queries(cfg, CALLS_PER_PROGRAM)
        times, gpu_times, refused = {}, {}, {}
        for name, impl in impls.items():
            args = [(dense_cache(kv, t),) for kv, _, t in caches] if impl.dense else caches
            try:
                times[name], gpu_times[name] = time_calls(impl.fn, queries, args, gpu_time)
            except Exception as error:  # noqa: BLE001 - only a may_refuse peer's error is kept as a result
                if not impl.may_refuse:
                    raise
                refused[name] = refusal(error)
            del args
        for name in impls:
            if name in refused:
                rows.append({"config": cfg.name, "impl": name, "refused": refused[name]})
                continue
            rows.append(measured_row(cfg, name, times, gpu_times[name], copy_gbps, matmul_tflops))
        del caches, queries
        if after_config is not None:
            after_config(rows)
    return rows, copy_gbps, matmul_tflops


def print_table(rows, copy_gbps: float, matmul_tflops: float) -> None:
    peers = sorted({k for r in rows for k in r if k.startswith("x_")})
    gpu = [k for k in ("gpu_us", "gpu_%copy") if any(k in r for r in rows)]
    header = ["config", "impl", "time_us", "GB/s", "%copy", "TFLOP/s", "%matmul", *gpu, *peers]
    print(f"\ndevice: {jax.devices()[0].device_kind}; copy ceiling {copy_gbps:.0f} GB/s; "
          f"bf16 matmul ceiling {matmul_tflops:.0f} TFLOP/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        if "refused" in r:
            print(f"| {r['config']} | {r['impl']} | refused: {r['refused']} |")
            continue
        cells = [r["config"], r["impl"]] + [
            f"{r[k]:.2f}" if k.startswith("x_") and k in r else ("" if k not in r else f"{r[k]:.1f}") for k in header[2:]
        ]
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short grid (the foundation's check)")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--cache-sets", type=int, default=4, help="caches rotated on configs under 256 MB")
    parser.add_argument("--configs", help="comma-separated configs instead of a grid, e.g. 'b1 s1024 h16 sq1,b128 s4096 h16 sq1'")
    parser.add_argument("--impls", help="comma-separated implementations to time (default: all that can run here)")
    parser.add_argument("--small-ceilings", action="store_true", help="tiny ceiling problems: a CPU smoke run of this script")
    parser.add_argument("--gpu-time", action="store_true",
                        help="also each call's GPU time alone (the span of its kernels in one traced run after the "
                             "row's wall timing; GPU only)")
    args = parser.parse_args(argv)

    impls = implementations(kernel=jax_etap.kernel_available())
    if args.impls:
        unknown = set(args.impls.split(",")) - set(impls)
        if unknown:
            parser.error(f"--impls: {sorted(unknown)} cannot run here; choose from {sorted(impls)}")
        impls = {name: impls[name] for name in args.impls.split(",")}
    grid = [Config.parse(c) for c in args.configs.split(",")] if args.configs else QUICK_GRID if args.quick else FULL_GRID
    if args.gpu_time and jax.devices()[0].platform != "gpu":
        parser.error("--gpu-time reads the GPU's kernels from a trace, and this machine runs jax on "
                     f"{jax.devices()[0].platform}")
    checkpoint = (lambda rows: write_csv(args.csv, rows)) if args.csv else None
    rows, copy_gbps, matmul_tflops = run(grid, impls, args.cache_sets, "small" if args.small_ceilings else "gpu",
                                         args.gpu_time, after_config=checkpoint)
    print_table(rows, copy_gbps, matmul_tflops)


if __name__ == "__main__":
    main()
