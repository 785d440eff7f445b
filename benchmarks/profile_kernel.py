"""Runs one decode config a few times, for a profiler (Nsight Compute) to pick a launch.

    ncu --kernel-name regex:decode_sm90 --launch-skip 2 --launch-count 1 \
        python3 benchmarks/profile_kernel.py --batch 128 --seqlen 4096 --heads 16
"""

from __future__ import annotations

import argparse
import os

# jax otherwise reserves 75% of the GPU up front, and a multi-pass ncu replay then saves
# and restores all of it around every pass ("Backing up device memory in system memory"),
# which made a 4-section profile of one small launch outlast a 60 s limit.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after the allocator setting)
from bench import Config, make_cache, make_queries  # noqa: E402

import jax_etap  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--s-q", type=int, default=1)
    parser.add_argument("--implementation", default="cuda")
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    cfg = Config(args.batch, args.seqlen, args.heads, args.s_q)
    kv, seqlens, table = make_cache(cfg, 0)
    decode = jax.jit(lambda q: jax_etap.mla_decode(q, kv, seqlens, table, causal=True, implementation=args.implementation))
    for q in make_queries(cfg, args.calls):
        jax.block_until_ready(decode(q))


if __name__ == "__main__":
    main()
