"""The FP8 latent cache's cost on `jax_etap.flax.MultiHeadLatentAttention`'s outputs.

    python3 tests/fp8_layer_accuracy.py [--lengths 64,512,2048] [--steps 8] [--seed 0]

prints, per prompt length, the relative error norm ||out - ref|| / ||ref|| of the layer's
decode outputs with a bfloat16 cache and with an FP8 cache, against the float64 oracle
(`numpy_mla_layer`) on the unquantized token stream, and the FP8 run against the same
oracle over the rows the FP8 cache holds, dequantized (`numpy_fp8`): what is left once the
quantization itself is accounted for. The layer has DeepSeek-V3's cache row (512 latent +
64 rope, `deepseek_cases.V3_LATENT`) and a random checkpoint; every sequence of the batch
is prefilled (one prompt length each) and then decodes ``--steps`` single tokens.

It lives beside the tests because tests/test_fp8_cache.py checks with it and with their
oracles (run as a script, its own folder is on the import path).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import numpy_fp8
from deepseek_cases import V3_LATENT
from mla_cases import relative_error
from numpy_mla_layer import mla_attention_numpy
from test_flax_mla import jitted, layer_from_checkpoint

CACHES = {"bf16": jnp.bfloat16, "fp8": "fp8"}


def cache_rows(cache, b: int, length: int) -> np.ndarray:
    """float64 rows ``[length, 576]`` of sequence b as an FP8 cache holds them, dequantized by the NumPy oracle."""
    positions = np.arange(length)
    blocks = np.asarray(cache.block_table)[b, positions // cache.block_size]
    tokens = np.asarray(cache.pages)[blocks, positions % cache.block_size, 0]
    return numpy_fp8.dequantize(tokens, np.float32).astype(np.float64)


def decode_errors(module, checkpoint, spec, lengths, steps, rng, *, block_size: int = 16) -> dict:
    """Prefill prompts of ``lengths`` (one per sequence), decode ``steps`` (tokens per
    call) with each cache of CACHES, and compare with the float64 oracle.

    Returns ``{"prefill": {cache: out}, "error": {cache: [per sequence]},
    "fp8_vs_dequantized": [per sequence]}``: prefill outputs ``[batch, s, hidden]``, and
    relative error norms of each sequence's decode outputs.
    """
    hidden, batch = spec["hidden_size"], len(lengths)
    prompts = rng.standard_normal((batch, max(lengths), hidden)).astype(np.float32)
    inputs = [rng.standard_normal((batch, n, hidden)).astype(np.float32) for n in steps]
    prefill, decode = jitted(module)
    prefilled, decoded, caches = {}, {}, {}
    for name, dtype in CACHES.items():
        cache = module.init_cache(batch, max(lengths) + sum(steps), block_size=block_size, dtype=dtype)
        out, cache = prefill(prompts, lengths, cache)
        outs = []
        for x in inputs:
            y, cache = decode(x, cache)
            outs.append(np.asarray(y))
        prefilled[name], decoded[name], caches[name] = np.asarray(out), np.concatenate(outs, axis=1), cache
    result = {"prefill": prefilled, "error": {name: [] for name in CACHES}, "fp8_vs_dequantized": []}
    for b, length in enumerate(lengths):
        stream = np.concatenate([prompts[b, :length]] + [x[b] for x in inputs])
        expected = mla_attention_numpy(checkpoint, spec, stream)[length:]
        for name in CACHES:
            result["error"][name].append(relative_error(decoded[name][b], expected))
        rows = cache_rows(caches["fp8"], b, len(stream))
        on_rows = mla_attention_numpy(checkpoint, spec, stream, rows=rows)[length:]
        result["fp8_vs_dequantized"].append(relative_error(decoded["fp8"][b], on_rows))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="64,512,2048", help="prompt lengths, one sequence each")
    parser.add_argument("--steps", type=int, default=8, help="single-token decode steps after the prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    rng = np.random.default_rng(args.seed)
    with jax.default_matmul_precision("highest"):
        module, checkpoint = layer_from_checkpoint(V3_LATENT, rng)
        result = decode_errors(module, checkpoint, V3_LATENT, lengths, [1] * args.steps, rng)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True).stdout.strip()
    print(f"{datetime.date.today()}, {jax.devices()[0].device_kind}, jax {jax.__version__}, commit {commit or '?'}; "
          f"V3_LATENT layer, seed {args.seed}, {args.steps} decode steps; prefill outputs identical: "
          f"{np.array_equal(result['prefill']['bf16'], result['prefill']['fp8'])}")
    print("| prompt length | bf16 cache | FP8 cache | FP8 / bf16 | FP8 vs oracle on its dequantized rows |")
    print("|---|---|---|---|---|")
    for b, length in enumerate(lengths):
        bf16, fp8 = result["error"]["bf16"][b], result["error"]["fp8"][b]
        print(f"| {length} | {bf16:.2e} | {fp8:.2e} | {fp8 / bf16:.1f} | {result['fp8_vs_dequantized'][b]:.2e} |")


if __name__ == "__main__":
    main()
