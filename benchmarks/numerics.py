"""Numerics study: the error of the kernel and of the reference against float64, next to
the error of merely rounding the exact result to the output dtype (the floor).

    python3 benchmarks/numerics.py [--out DIR]      # on the GPU: the full grid, kernel included
    python3 benchmarks/numerics.py --small          # on CPU: a small grid, the reference only
    python3 benchmarks/numerics.py --heads 32 --seqlens 1024,4096   # part of the grid, or points off it

Problem (FlashMLA's decode setting): batch 16, causal, s_q 1, d_qk 576, head_dim_v 512,
h_kv 1, bf16, a paged cache of shuffled 64-token blocks, q and cache ~ N(0, 1); every
sequence has the full length. Grid: length 1K, 4K, 16K, 64K x query heads 16, 128.

For each point, against the float64 result of the same (rounded) inputs (the tests'
oracle, jax_etap.testing.mla_decode_numpy, BLAS products in float64):
  * kernel     - `mla_decode(implementation="cuda")` (GPU only);
  * reference  - `mla_decode(implementation="xla")`, the jnp reference: float32 inside,
                 output rounded to bf16;
  * floor      - the float64 result rounded to bf16: no bf16 output can be closer;
  * with --fp8, reference-fp8 (and kernel-fp8 on the GPU): the same call on the pool
                 quantized to the FP8 cache layout (`jax_etap.fp8.quantize`), against the
                 float64 result of the unquantized pool: the accuracy cost of the FP8 cache.
Columns: rms (root mean square error over all output elements; this is the RMSE metric
of the ETAP paper), max_abs, rel (||out - exact|| / ||exact||), ratio (rms / the floor's
rms), lse_max_abs (lse against the float64 lse; the floor has none). Writes
DIR/numerics.csv and, where matplotlib is installed, DIR/numerics.png.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_etap
from jax_etap.testing import mla_decode_numpy, random_paged_cache, relative_error, to_f32

BLOCK_SIZE, D_QK, D_V = 64, 576, 512
FULL = dict(batch=16, seqlens=(1024, 4096, 16384, 65536), heads=(16, 128))
SMALL = dict(batch=2, seqlens=(256, 1024), heads=(4, 16))
COLUMNS = ["seqlen", "h_q", "impl", "rms", "max_abs", "rel", "ratio", "lse_max_abs"]


def paged_cache(batch: int, seqlen: int, dtype, key: jax.Array):
    """A random pool on the device, a shuffled table, the lengths; and the pool in float64 on the host."""
    pool, seqlens, table = random_paged_cache(key, batch, seqlen, block_size=BLOCK_SIZE, d_qk=D_QK, dtype=dtype)
    return pool, table, seqlens, to_f32(pool).astype(np.float64)


def decoder(implementation: str):
    return jax.jit(lambda q, kv, s, t: jax_etap.mla_decode(q, kv, s, t, head_dim_v=D_V, causal=True,
                                                            implementation=implementation))


def fp8_decoder(implementation: str):
    """`decoder` on the pool quantized to the FP8 cache layout first."""
    decode = decoder(implementation)
    return jax.jit(lambda q, kv, s, t: decode(q, jax_etap.fp8.quantize(kv), s, t))


def error_row(seqlen: int, h_q: int, impl: str, out: np.ndarray, exact: np.ndarray, floor_rms: float,
              lse=None, exact_lse=None) -> dict:
    diff = out - exact
    rms = float(np.sqrt(np.mean(diff**2)))
    return {
        "seqlen": seqlen, "h_q": h_q, "impl": impl, "rms": rms, "max_abs": float(np.abs(diff).max()),
        "rel": relative_error(out, exact), "ratio": rms / floor_rms,
        "lse_max_abs": float("nan") if lse is None else float(np.abs(np.asarray(lse, np.float64) - exact_lse).max()),
    }


def study(grid: dict, dtype, kernel: bool, seed: int, fp8: bool = False) -> list[dict]:
    key = jax.random.key(seed)
    implementations = {"reference": decoder("xla")}
    if kernel:
        implementations = {"kernel": decoder("cuda"), **implementations}
    if fp8:
        implementations.update({f"{name}-fp8": fp8_decoder(impl) for name, impl in (("kernel", "cuda"), ("reference", "xla"))
                                if name in implementations})
    rows = []
    for seqlen in grid["seqlens"]:
        key, cache_key = jax.random.split(key)
        pool, table, seqlens, pool64 = paged_cache(grid["batch"], seqlen, dtype, cache_key)
        for h_q in grid["heads"]:
            began = time.perf_counter()
            key, q_key = jax.random.split(key)
            q = jax.random.normal(q_key, (grid["batch"], 1, h_q, D_QK), dtype)
            exact, exact_lse = mla_decode_numpy(to_f32(q), pool64, np.asarray(seqlens), np.asarray(table),
                                                head_dim_v=D_V, causal=True)
            floor = exact.astype(jnp.dtype(dtype)).astype(np.float64)
            floor_rms = float(np.sqrt(np.mean((floor - exact) ** 2)))
            rows.append(error_row(seqlen, h_q, "floor", floor, exact, floor_rms))
            for name, fn in implementations.items():
                out, lse = fn(q, pool, seqlens, table)
                rows.append(error_row(seqlen, h_q, name, to_f32(out).astype(np.float64), exact, floor_rms, lse,
                                      exact_lse))
            print(f"  s {seqlen} h {h_q}: " + ", ".join(f"{r['impl']} rms {r['rms']:.3e} ({r['ratio']:.4f}x)"
                                                     for r in rows[-1 - len(implementations):])
                  + f"  [{time.perf_counter() - began:.1f} s]", flush=True)
        del pool, pool64
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, dtype_name: str) -> str:
    """RMS error and its ratio to the floor against the length, one column per head count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: wrote the CSV only, no plot"
    heads = sorted({r["h_q"] for r in rows})
    impls = [i for i in ("kernel", "reference", "kernel-fp8", "reference-fp8", "floor") if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(2, len(heads), figsize=(5 * len(heads), 7), squeeze=False, sharex=True)
    for col, h_q in enumerate(heads):
        for impl in impls:
            points = sorted((r["seqlen"], r["rms"], r["ratio"]) for r in rows if r["h_q"] == h_q and r["impl"] == impl)
            lengths, rms, ratio = zip(*points)
            axes[0, col].plot(lengths, rms, marker="o", label=impl)
            axes[1, col].plot(lengths, ratio, marker="o", label=impl)
        axes[0, col].set_title(f"{h_q} query heads, {dtype_name}")
        axes[0, col].set_ylabel("RMS error vs float64")
        axes[1, col].axhline(1.1, color="grey", linestyle="--", linewidth=1, label="1.1x the floor")
        axes[1, col].set_ylabel("RMS error / floor")
        axes[1, col].set_xlabel("sequence length (keys)")
        for row in range(2):
            axes[row, col].set_xscale("log", base=2)
            axes[row, col].grid(True, which="both", alpha=0.3)
            axes[row, col].legend()
        axes[0, col].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def print_table(rows: list[dict]) -> None:
    print("| seqlen | h_q | impl | RMS (RMSE) | max abs | rel | RMS / floor | lse max abs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seqlen']} | {r['h_q']} | {r['impl']} | {r['rms']:.3e} | {r['max_abs']:.3e} | {r['rel']:.3e} | "
              f"{r['ratio']:.4f} | {r['lse_max_abs']:.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small grid (batch 2, lengths 256/1K, 4/16 heads)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fp8", action="store_true", help="also decode from the pool quantized to the FP8 cache layout")
    parser.add_argument("--out", default="device_out/numerics", help="folder for numerics.csv and numerics.png")
    parser.add_argument("--plot-csv", metavar="CSV", help="only redraw the plot of an earlier run's CSV, as --out/numerics.png")
    parser.add_argument("--heads", help="comma-separated query head counts instead of the grid's, e.g. 32")
    parser.add_argument("--seqlens", help="comma-separated lengths instead of the grid's, e.g. 1024,4096")
    args = parser.parse_args(argv)
    if args.plot_csv:
        with open(args.plot_csv, newline="") as f:
            rows = [{k: (v if k == "impl" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(plot(rows, Path(args.out) / "numerics.png", args.dtype))
        return 0
    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16}[args.dtype]
    kernel = jax_etap.kernel_available()
    grid = dict(SMALL if args.small else FULL)
    for name in ("heads", "seqlens"):
        if getattr(args, name):
            grid[name] = tuple(int(x) for x in getattr(args, name).split(","))
    print(f"numerics: {args.dtype}, batch {grid['batch']}, lengths {grid['seqlens']}, heads {grid['heads']}, "
          f"on {jax.devices()[0]}; kernel {'included' if kernel else 'not available here: reference only'}",
          flush=True)

    began = time.perf_counter()
    rows = study(grid, dtype, kernel, args.seed, args.fp8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "numerics.csv")
    print(plot(rows, out / "numerics.png", args.dtype))
    print_table(rows)
    worst = {impl: max(r["ratio"] for r in rows if r["impl"] == impl) for impl in ("kernel", "reference", "kernel-fp8", "reference-fp8")
             if any(r["impl"] == impl for r in rows)}
    print(f"numerics: done in {time.perf_counter() - began:.0f} s; worst RMS / floor: "
          + ", ".join(f"{impl} {ratio:.3f}x" for impl, ratio in worst.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
