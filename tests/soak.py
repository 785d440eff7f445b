"""Soak: a long jitted generation loop, the kernel checked against the reference as it runs.

    python3 tests/soak.py [--steps 10000] [--chunk 500] [--out DIR]   # on the GPU
    python3 tests/soak.py --steps 200 --small                          # a CPU smoke run

It lives beside the tests because it checks with their tolerances and oracle (run as a
script, its own folder is on the import path, so `mla_cases` imports plainly).

Each decode step of the loop writes one new random latent token per sequence into a paged
KV cache (at the slot its block table gives for position seqlen), grows the sequence by
one and decodes a random query over it, the way a serving loop does. The steps run on the
device in `lax.fori_loop` chunks of ``--chunk`` steps, one jitted call each, with the cache
donated so it is updated in place. Every step's output feeds a running checksum and a
count of steps with a NaN, so no step can be optimised away or go wrong unseen.

The cache pool starts as NaN everywhere but the sequences' tokens, so a read of any slot
past a sequence's end shows as NaN. Sequences start at different lengths and cross
block boundaries at different steps. After each chunk the host checks:
  * no step so far produced a NaN;
  * the chunk's last step: the kernel's (out, lse) against the jnp reference
    (implementation="xla") on the same inputs, and both against the float64 oracle, within
    the tests' tolerances (tests/mla_cases.py: relative error norm <= 1e-2 in bf16, lse
    within 1e-3) - so errors stay at bf16 rounding however long the cache grows;
  * device memory in use (after a garbage collection) does not grow between the first
    check and the last (on backends that report it).
It prints a summary line last and writes one CSV row per check to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from mla_cases import Case, assert_matches, decode, relative_error, to_f32

import jax_etap
from jax_etap.testing import shuffled_block_table

MEMORY_SLACK_BYTES = 1 << 20  # allocator noise; one leaked cache or per-step buffer is far more


@dataclasses.dataclass(frozen=True)
class SoakShape:
    batch: int
    h_q: int
    d_qk: int
    head_dim_v: int
    block_size: int
    longest_start: int  # initial lengths are drawn in [1, longest_start]


FULL = SoakShape(batch=4, h_q=16, d_qk=576, head_dim_v=512, block_size=64, longest_start=300)
SMALL = SoakShape(batch=2, h_q=4, d_qk=64, head_dim_v=64, block_size=16, longest_start=40)


class State(NamedTuple):
    """What the loop carries: the cache and lengths, the PRNG key, the last step's inputs
    and outputs (for the host's check), and what every step contributes to."""

    cache: jax.Array  # [num_blocks, block_size, 1, d_qk]
    seqlens: jax.Array  # [batch] int32
    key: jax.Array
    q: jax.Array  # the last step's query
    out: jax.Array  # the last step's output
    lse: jax.Array
    nan_steps: jax.Array  # int32: steps whose out or lse had a NaN
    checksum: jax.Array  # float32 sum of every output


def initial_state(shape: SoakShape, steps: int, dtype, seed: int) -> tuple[State, jax.Array]:
    """A NaN pool holding random initial tokens, and a shuffled block table with room for
    ``steps`` more tokens per sequence (plus two blocks nobody uses)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(1, shape.longest_start + 1, shape.batch)
    per_seq = -(-(int(starts.max()) + steps) // shape.block_size)
    table = np.asarray(shuffled_block_table(jax.random.key(seed), shape.batch, per_seq, shape.batch * per_seq + 2))
    num_blocks = shape.batch * per_seq + 2
    pool = np.full((num_blocks, shape.block_size, 1, shape.d_qk), np.nan, np.float32)
    for b, n in enumerate(starts):
        t = np.arange(n)
        pool[table[b, t // shape.block_size], t % shape.block_size] = rng.standard_normal((n, 1, shape.d_qk))
    q_shape = (shape.batch, 1, shape.h_q, shape.d_qk)
    state = State(
        cache=jnp.asarray(pool.astype(jnp.dtype(dtype))),
        seqlens=jnp.asarray(starts, jnp.int32),
        key=jax.random.key(seed),
        q=jnp.zeros(q_shape, dtype),
        out=jnp.zeros((shape.batch, 1, shape.h_q, shape.head_dim_v), dtype),
        lse=jnp.zeros((shape.batch, shape.h_q, 1), jnp.float32),
        nan_steps=jnp.zeros((), jnp.int32),
        checksum=jnp.zeros((), jnp.float32),
    )
    return state, jnp.asarray(table, jnp.int32)


def random_values(key: jax.Array, shape: tuple, dtype) -> jax.Array:
    """N(0, 1) values of ``dtype``, rounded where XLA cannot skip the rounding.

    With XLA's default excess precision, ``jax.random.normal(key, shape, bf16)`` feeding a
    float32 computation in the same graph may reach it unrounded, so the reference inside
    the loop would see other values than the bf16 ones the host checks it on.
    """
    finfo = jnp.finfo(dtype)
    rounded = jax.lax.reduce_precision(jax.random.normal(key, shape, jnp.float32), finfo.nexp, finfo.nmant)
    return rounded.astype(dtype)


def make_chunk(shape: SoakShape, steps: int, implementation: str | None):
    """The jitted function (state, block table) -> state ``steps`` decode steps later."""

    def chunk(state: State, table: jax.Array) -> State:
        def step(_, state: State) -> State:
            key, token_key, q_key = jax.random.split(state.key, 3)
            position = state.seqlens  # where each sequence's new token goes
            block = table[jnp.arange(shape.batch), position // shape.block_size]
            token = random_values(token_key, (shape.batch, shape.d_qk), state.cache.dtype)
            cache = state.cache.at[block, position % shape.block_size, 0].set(token)
            seqlens = position + 1
            q = random_values(q_key, state.q.shape, state.q.dtype)
            out, lse = jax_etap.mla_decode(q, cache, seqlens, table, head_dim_v=shape.head_dim_v, causal=True,
                                           implementation=implementation)
            bad = (jnp.isnan(out).any() | jnp.isnan(lse).any()).astype(jnp.int32)
            return State(cache, seqlens, key, q, out, lse, state.nan_steps + bad,
                         state.checksum + out.astype(jnp.float32).sum())

        return jax.lax.fori_loop(0, steps, step, state)

    return jax.jit(chunk, donate_argnums=0)


def check_last_step(state: State, table: jax.Array, shape: SoakShape) -> dict[str, float]:
    """The chunk's last step against the reference and the float64 oracle (raises if off);
    returns the relative errors."""
    case = Case(q=state.q, kv_cache=state.cache, cache_seqlens=state.seqlens, block_table=table,
                head_dim_v=shape.head_dim_v, causal=True)
    ref_out, ref_lse = decode(case, "xla")
    exact_out, exact_lse = case.oracle()
    dtype = case.dtype
    assert_matches(state.out, state.lse, to_f32(ref_out), np.asarray(ref_lse), dtype, what="kernel vs reference out")
    assert_matches(state.out, state.lse, exact_out, exact_lse, dtype, what="kernel vs float64 out")
    assert_matches(ref_out, ref_lse, exact_out, exact_lse, dtype, what="reference vs float64 out")
    out, ref_out = to_f32(state.out), to_f32(ref_out)
    return {
        "kernel_vs_reference": relative_error(out, ref_out),
        "kernel_vs_float64": relative_error(out, exact_out),
        "reference_vs_float64": relative_error(ref_out, exact_out),
    }


def device_bytes_in_use() -> int | None:
    """Bytes the default device has allocated now, after a collection (None: not reported)."""
    gc.collect()
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else int(stats["bytes_in_use"])


def soak(shape: SoakShape, steps: int, chunk: int, implementation: str | None, dtype, seed: int) -> tuple[list[dict], int]:
    """Runs the loop, checking after every chunk (raises on a failure). Returns one row per
    check, and how many block boundaries the sequences crossed in all."""
    state, table = initial_state(shape, steps, dtype, seed)
    starts = np.asarray(state.seqlens)
    advance = make_chunk(shape, chunk, implementation)
    rows = []
    for done in range(chunk, steps + 1, chunk):
        began = time.perf_counter()
        state = jax.block_until_ready(advance(state, table))
        seconds = time.perf_counter() - began
        lengths = np.asarray(state.seqlens)
        assert (lengths == starts + done).all(), f"lengths {lengths}, expected {starts + done}"
        nan_steps = int(state.nan_steps)
        assert nan_steps == 0, f"{nan_steps} of the first {done} steps gave a NaN"
        errors = check_last_step(state, table, shape)
        row = {"steps": done, "shortest": int(lengths.min()), "longest": int(lengths.max()), **errors,
               "bytes_in_use": device_bytes_in_use(), "chunk_seconds": seconds}
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    assert np.isfinite(float(state.checksum)), "the checksum of all outputs is not finite"
    first, last = rows[0]["bytes_in_use"], rows[-1]["bytes_in_use"]
    if first is not None:
        assert last - first <= MEMORY_SLACK_BYTES, f"device memory grew by {last - first} bytes over the soak"
    crossed = ((lengths - 1) // shape.block_size - (starts - 1) // shape.block_size).sum()
    return rows, int(crossed)


def summary(rows: list[dict], crossed: int, shape: SoakShape, implementation: str | None, chunk: int,
            seconds: float) -> str:
    first, last = rows[0], rows[-1]
    memory = ("device memory not reported" if first["bytes_in_use"] is None else
              f"device memory {first['bytes_in_use']} -> {last['bytes_in_use']} bytes "
              f"({last['bytes_in_use'] - first['bytes_in_use']:+d})")
    # Per step: the chunks after the first (which includes compiling).
    later = [r["chunk_seconds"] for r in rows[1:]] or [rows[0]["chunk_seconds"]]
    return (f"soak: OK {last['steps']} steps ({len(rows)} chunks of {chunk}), implementation "
            f"{implementation or 'default'} on {jax.devices()[0].platform}, batch {shape.batch}, {shape.h_q} heads, "
            f"lengths up to {last['longest']} ({crossed} block boundaries crossed); max relative error kernel vs "
            f"reference {max(r['kernel_vs_reference'] for r in rows):.2e}, kernel vs float64 "
            f"{max(r['kernel_vs_float64'] for r in rows):.2e} (first {first['kernel_vs_float64']:.2e}, last "
            f"{last['kernel_vs_float64']:.2e}), reference vs float64 {max(r['reference_vs_float64'] for r in rows):.2e}; "
            f"no NaN; {memory}; {seconds:.1f} s, {1e6 * np.mean(later) / chunk:.0f} us/step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, help="steps per jitted call (default 500; 50 with --small)")
    parser.add_argument("--small", action="store_true", help="a tiny problem (d 64, 4 heads) for a CPU smoke run")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="device_out/soak", help="folder for soak.csv")
    args = parser.parse_args(argv)
    shape = SMALL if args.small else FULL
    chunk = min(args.chunk or (50 if args.small else 500), args.steps)
    if args.steps % chunk:
        parser.error(f"--steps {args.steps} is not a multiple of the chunk {chunk}")
    implementation = "cuda" if jax_etap.kernel_available() else None
    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16}[args.dtype]

    began = time.perf_counter()
    try:
        rows, crossed = soak(shape, args.steps, chunk, implementation, dtype, args.seed)
    except AssertionError as err:
        print(f"soak: FAILED: {err}", flush=True)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(summary(rows, crossed, shape, implementation, chunk, time.perf_counter() - began), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
