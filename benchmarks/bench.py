"""Times `mla_decode` against its peers and the device's ceilings, in one process.

    python benchmarks/bench.py [--quick] [--configs "b1 s1024 h16 sq1,..."] [--impls cuda,plain_jnp]
                               [--csv FILE] [--small-ceilings]

Run it as a script without ``-P``: its own folder, not the repository root, then leads the
import path, so the installed jax_etap is imported and the sibling modules (timing,
ceilings, gpu_trace, peers/) import plainly.

One row per (config, implementation): the GPU time of a call (the median over 32 calls of
the span of its kernels, from the profiler: timing.py), the wall time of a call in a
chained decode loop, GB/s and TFLOP/s by the GPU time, the fraction of the copy ceiling
(torch's device-to-device copy where torch runs, else XLA's, as the header line says),
whether its output agrees with ours, and the speedup over each peer (the peer's time over
this one's; FlashMLA's builds first). Peers: plain jnp, `jax.nn.dot_product_attention`,
tokamax's kernels where tokamax is installed, and the FlashMLA builds that
benchmarks/peers/flashmla.py finds. A peer that fails on a config (its shape, or the jax it
runs on) gets a row with its error instead of ending the run.
On a CPU (``--small-ceilings``) the script runs end to end by wall time; what needs a GPU
is skipped and said so.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import os
import re
import time
from dataclasses import dataclass

# torch's peers and ceilings share the GPU with jax in this process: jax must not take 75%
# of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import ceilings  # noqa: E402 - after the allocator setting
import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
from timing import CALLS, Timing, l2_cache_bytes, on_gpu, rotation, time_calls

import jax_etap
from jax_etap.testing import random_paged_cache, relative_error, to_f32

BLOCK_SIZE = 64
D_QK, D_V = 576, 512
# Two bf16 results that are each within 1e-2 (relative error norm) of the float64 result,
# the tests' bound (tests/mla_cases.py), are within 2e-2 of each other.
AGREEMENT_RTOL = 2e-2


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


# The grid: memory-bound rows at 16-64 heads, compute-bound rows at 128 heads or s_q 2,
# batch 1 for split-KV, and a latency row.
FULL_GRID = [
    Config(128, 4096, 16, 1), Config(128, 8192, 16, 1), Config(128, 16384, 16, 1), Config(16, 65536, 16, 1),
    Config(128, 8192, 32, 1), Config(128, 8192, 64, 1), Config(128, 8192, 128, 1), Config(128, 8192, 64, 2),
    Config(128, 8192, 128, 2), Config(1, 65536, 16, 1), Config(1, 131072, 128, 1), Config(1, 1024, 16, 1),
]
QUICK_GRID = [Config(128, 4096, 16, 1), Config(16, 65536, 16, 1), Config(128, 8192, 128, 1), Config(1, 65536, 16, 1),
              Config(1, 1024, 16, 1)]


def make_cache(cfg: Config, seed: int):
    """A random bf16 paged cache of full-length sequences, blocks shuffled over the pool."""
    return random_paged_cache(jax.random.key(seed), cfg.batch, cfg.seqlen, block_size=BLOCK_SIZE, d_qk=D_QK)


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
    """name -> Impl of every JAX implementation that can run here (ours first)."""
    def decode(implementation):
        return lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, causal=True, implementation=implementation)

    impls = {}
    if kernel:
        impls["cuda"] = Impl(decode("cuda"), dense=False)
        impls["portable"] = Impl(decode("portable"), dense=False)  # the foundation kernel, on the same GPU
    impls.update({
        "reference": Impl(decode("xla"), dense=False),
        "plain_jnp": Impl(plain_jnp_decode, dense=True),
        "dot_product_attention": Impl(xla_attention_decode, dense=True),
    })
    if importlib.util.find_spec("tokamax") is not None:
        for backend in ("triton", "mosaic", "xla"):
            impls[f"tokamax_{backend}"] = Impl(tokamax_decode(backend), dense=True, may_refuse=True)
    return impls


def flashmla_peer():
    """benchmarks/peers/flashmla.py, or None where it is absent."""
    try:
        return importlib.import_module("peers.flashmla")
    except ModuleNotFoundError as error:
        if error.name not in ("peers", "peers.flashmla"):
            raise
        return None


def ours(impls) -> str:
    """The implementation the others are checked against: the kernel where it runs."""
    return "cuda" if "cuda" in impls else "reference"


def refusal(error: Exception) -> str:
    """An exception as one line of a table: its type and the first line of its message."""
    first_line = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first_line[:160]}"


@dataclass
class Measured:
    timing: Timing
    out: np.ndarray  # the first call's out, float32


def measure_jax(impl: Impl, queries, caches, gpu: bool) -> Measured:
    args = [(dense_cache(kv, t),) for kv, _, t in caches] if impl.dense else caches
    timing, first = time_calls(impl.fn, queries, args, gpu)
    out = first[0] if isinstance(first, tuple) else first  # mla_decode gives (out, lse), the peers out
    return Measured(timing, to_f32(out))


def measure_flashmla(peer, build: str, queries, caches) -> Measured:
    return peer_measured(peer.measure(build, queries, caches, causal=True, softmax_scale=D_QK**-0.5,
                                      calls=len(queries)))


def peer_measured(result: dict) -> Measured:
    """A torch peer's result (``gpu_us``, ``kernel_us``, ``wall_us``, ``out``) as a Measured."""
    timing = Timing(wall_s=result["wall_us"] / 1e6, gpu_s=[us / 1e6 for us in result["gpu_us"]],
                    kernel_us=result["kernel_us"])
    return Measured(timing, np.asarray(result["out"], np.float32))


def check(out: np.ndarray, reference: np.ndarray) -> str:
    """``ok <error>`` where an output agrees with ours, else ``DIFFERS <error>``."""
    if out.shape != reference.shape:
        return f"DIFFERS: shape {out.shape}, ours {reference.shape}"
    error = relative_error(out, reference)
    return f"{'ok' if error <= AGREEMENT_RTOL else 'DIFFERS'} {error:.1e}"


def measured_row(cfg: Config, name: str, results: dict[str, Measured], reference: str, copy_gbps: float,
                 matmul_tflops: float) -> dict:
    """One implementation's row: GPU and wall time, rates by the headline time (GPU where
    measured), their fractions of the ceilings, the check against ours, and the speedup
    over each peer (`speedup`; the FlashMLA builds first)."""
    own = results[name]
    seconds = own.timing.headline_s
    gbps, tflops = cfg.bytes_moved() / seconds / 1e9, cfg.flops() / seconds / 1e12
    gpu = own.timing.gpu_median_s
    peers = sorted((p for p in results if p != name), key=lambda p: (not p.startswith("flashmla"), p))
    return {
        "config": cfg.name, "impl": name, "gpu_us": "" if gpu is None else gpu * 1e6,
        "wall_us": own.timing.wall_s * 1e6, "GB/s": gbps, "TFLOP/s": tflops,
        "%copy": 100 * gbps / copy_gbps, "%matmul": 100 * tflops / matmul_tflops,
        "check": "ours" if name == reference else check(own.out, results[reference].out),
        **{f"x_{peer}": speedup(own.timing, results[peer].timing) for peer in peers},
        "kernels_us": kernels_cell(own.timing.kernel_us),
    }


def kernels_cell(kernel_us: dict[str, float] | None) -> str:
    """Where a call's GPU time goes: ``decode_sm90_kernel 190.2; combine_splits_kernel 6.1``."""
    return "" if kernel_us is None else "; ".join(f"{name} {us:.1f}" for name, us in kernel_us.items())


def speedup(own: Timing, peer: Timing) -> float:
    """The peer's time over this one's, by GPU time where both have it, else by wall time."""
    if own.gpu_s is not None and peer.gpu_s is not None:
        return peer.gpu_median_s / own.gpu_median_s
    return peer.wall_s / own.wall_s


def row_columns(rows: list[dict]) -> list[str]:
    fixed = ["config", "impl", "gpu_us", "wall_us", "GB/s", "TFLOP/s", "%copy", "%matmul", "check"]
    ratios = sorted({k for r in rows for k in r if k.startswith("x_")}, key=lambda k: (not k.startswith("x_flashmla"), k))
    return fixed + ratios + ["kernels_us"] + (["refused"] if any("refused" in r for r in rows) else [])


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def progress_line(done: int, total: int, label: str, elapsed_s: float, width: int = 24) -> str:
    """``[####--------------------] 3/12 b128 s16384 h16 sq1 (41 s)``: the bar fills with the
    configs done, the count names the one starting. A line a config: a log file keeps it,
    where a redrawn bar would not read."""
    filled = round(width * done / total)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done + 1}/{total} {label} ({elapsed_s:.0f} s)"


def run(grid, impls: dict[str, Impl], flashmla_builds: list[str], copy_gbps: float, matmul_tflops: float,
        l2_bytes: int, after_config=None) -> list[dict]:
    """Times every implementation on every config of ``grid``; ``after_config(rows)`` is
    called with the rows so far after each config of each pass (the CSV is rewritten there,
    so a run cut short by a time limit keeps what it measured).

    Two passes over the grid, on the same (seeded) inputs: the JAX implementations first,
    then FlashMLA's builds. CUPTI takes one subscriber a process, and once torch's profiler
    has subscribed jax's cannot (CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED, H100,
    2026-12-07); the other order works.
    """
    gpu = on_gpu()
    reference = ours(impls)
    peer = flashmla_peer() if flashmla_builds else None
    results = {cfg.name: {} for cfg in grid}
    refused = {cfg.name: {} for cfg in grid}

    def rows_so_far():
        rows = []
        for cfg in grid:
            for name in [*impls, *flashmla_builds]:
                if name in refused[cfg.name]:
                    rows.append({"config": cfg.name, "impl": name, "refused": refused[cfg.name][name]})
                elif name in results[cfg.name]:
                    rows.append(measured_row(cfg, name, results[cfg.name], reference, copy_gbps, matmul_tflops))
        return rows

    passes = [("jax", impls)] + ([("flashmla", flashmla_builds)] if flashmla_builds else [])
    started = time.perf_counter()
    for label, names in passes:
        for n, cfg in enumerate(grid):
            print(progress_line(n, len(grid), f"{cfg.name} [{label}]", time.perf_counter() - started), flush=True)
            caches = [make_cache(cfg, seed) for seed in range(rotation(cfg.bytes_moved(), l2_bytes))]
            queries = make_queries(cfg, CALLS)
            for name in names:
                try:
                    if label == "jax":
                        results[cfg.name][name] = measure_jax(impls[name], queries, caches, gpu)
                    else:
                        results[cfg.name][name] = measure_flashmla(peer, name, queries, caches)
                except Exception as error:  # noqa: BLE001 - only a peer's refusal is kept as a result
                    if label == "jax" and not impls[name].may_refuse:
                        raise
                    refused[cfg.name][name] = refusal(error)
            del caches, queries
            if after_config is not None:
                after_config(rows_so_far())
    return rows_so_far()


def cell(key: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if key.startswith("x_") else f"{value:.1f}"
    return str(value)


def print_table(rows, header_line: str, columns: list[str]) -> None:
    """A markdown table of ``columns`` (a refused row: its config, impl and refusal)."""
    columns = [c for c in columns if c != "refused"]
    print(f"\n{header_line}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        if "refused" in r:
            print(f"| {r['config']} | {r['impl']} | refused: {r['refused']} |")
        else:
            print("| " + " | ".join(cell(k, r.get(k, "")) for k in columns) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short grid")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--configs", help="comma-separated configs instead of a grid, e.g. 'b1 s1024 h16 sq1,b128 s4096 h16 sq1'")
    parser.add_argument("--impls", help="comma-separated implementations to time (default: all that can run here)")
    parser.add_argument("--small-ceilings", action="store_true", help="tiny ceiling problems: a CPU smoke run of this script")
    args = parser.parse_args(argv)

    gpu = on_gpu()
    impls = implementations(kernel=jax_etap.kernel_available())
    peer = flashmla_peer()
    builds = peer.builds() if peer is not None else []
    every = [*impls, *builds]
    chosen = args.impls.split(",") if args.impls else every
    unknown = set(chosen) - set(every)
    if unknown:
        parser.error(f"--impls: {sorted(unknown)} cannot run here; choose from {sorted(every)}")
    reference = ours(impls)
    if reference not in chosen:
        chosen.insert(0, reference)  # every row is checked against ours
    grid = [Config.parse(c) for c in args.configs.split(",")] if args.configs else QUICK_GRID if args.quick else FULL_GRID

    notes = []
    if not gpu:
        notes.append(f"GPU time not measured: jax runs on {jax.devices()[0].platform}; rates by wall time")
    if peer is None:
        notes.append("FlashMLA not run: benchmarks/peers/flashmla.py is absent")
    elif not builds:
        notes.append("FlashMLA not run: no build of it imports here")
    found, ceiling_notes = ceilings.measure("small" if args.small_ceilings else "gpu", gpu)
    notes += ceiling_notes
    l2_bytes, l2_note = l2_cache_bytes()
    notes.append(l2_note)
    for note in notes:
        print(f"note: {note}", flush=True)
    copy_gbps = found.get("torch_copy_gbps", found["xla_copy_gbps"])
    copy_name = "torch copy" if "torch_copy_gbps" in found else "XLA copy"
    matmul_tflops = found.get("torch_matmul_tflops", found["xla_matmul_tflops"])

    checkpoint = (lambda rows: write_csv(args.csv, rows, row_columns(rows))) if args.csv else None
    rows = run(grid, {n: impls[n] for n in chosen if n in impls}, [b for b in chosen if b in builds], copy_gbps,
               matmul_tflops, l2_bytes, after_config=checkpoint)
    ceiling_text = "; ".join(f"{k} {v:.0f}" for k, v in found.items())
    print_table(rows, f"device: {jax.devices()[0].device_kind}; {ceiling_text}; %copy of the {copy_name}, %matmul of "
                      f"its matmul; {'GPU' if gpu else 'wall'} time for the rates and ratios; {l2_note}", row_columns(rows))


if __name__ == "__main__":
    main()
