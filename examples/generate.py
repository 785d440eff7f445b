"""Greedy generation with a small, randomly initialised DeepSeek-style decoder.

Each layer is RMSNorm -> `jax_etap.flax.MultiHeadLatentAttention` -> RMSNorm -> SwiGLU
MLP, around residual connections; an embedding and an LM head close the stack. The
attention has DeepSeek-V3's latent width (kv_lora_rank 512 + rope 64 = 576) and its 16
heads per GPU under 8-way tensor parallelism, so on a GPU the decode steps run the
kernel's main configuration.

A batch of prompts of different lengths is prefilled (plain attention, one jitted call),
then ``--new-tokens`` tokens are generated in ONE jitted ``lax.scan`` of decode steps
(absorbed attention through `jax_etap.mla_decode` on the paged latent caches, which are
donated). On a CUDA GPU the decode steps run the CUDA kernel, elsewhere the jnp reference;
``--implementation xla`` forces the reference.

    python examples/generate.py [--layers 2] [--batch 4] [--new-tokens 64]
        [--implementation default|xla] [--kv-cache bf16|fp8] [--compare] [--command-buffers on|off]

--kv-cache fp8 keeps the latent caches in the FP8 layout of `jax_etap.fp8` (656 bytes a
token instead of 1152); decode then attends over the dequantized rows in bfloat16.

--compare also runs the reference loop and reports where the greedy tokens first differ.
--command-buffers off appends ``--xla_gpu_enable_command_buffer=`` to XLA_FLAGS (no CUDA
graphs); on keeps XLA's default command-buffer settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_etap
from jax_etap.cache import PagedKVCache, check_capacity
from jax_etap.flax import MLAConfig, MultiHeadLatentAttention


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """The decoder around the attention; names as in DeepSeek-V3's config.json."""

    attention: MLAConfig
    num_hidden_layers: int = 2
    vocab_size: int = 1024
    intermediate_size: int = 1024


def toy_config(num_hidden_layers: int = 2) -> ToyConfig:
    """A small model with DeepSeek-V3's latent width (576) and 16 heads."""
    attention = MLAConfig(hidden_size=512, num_attention_heads=16, q_lora_rank=192, kv_lora_rank=512,
                          qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32)
    return ToyConfig(attention=attention, num_hidden_layers=num_hidden_layers)


class SwiGLU(nnx.Module):
    """DeepSeek's dense MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs):
        self.gate_proj = nnx.Linear(hidden, intermediate, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(hidden, intermediate, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(intermediate, hidden, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ToyConfig, *, rngs: nnx.Rngs):
        hidden, eps = config.attention.hidden_size, config.attention.rms_norm_eps
        self.input_layernorm = nnx.RMSNorm(hidden, epsilon=eps, rngs=rngs)
        self.self_attn = MultiHeadLatentAttention(config.attention, rngs=rngs)
        self.post_attention_layernorm = nnx.RMSNorm(hidden, epsilon=eps, rngs=rngs)
        self.mlp = SwiGLU(hidden, config.intermediate_size, rngs=rngs)

    def __call__(self, x: jax.Array, cache: PagedKVCache, attend) -> tuple[jax.Array, PagedKVCache]:
        """``attend(attention_module, normed_x, cache) -> (out, cache)`` is prefill or decode."""
        out, cache = attend(self.self_attn, self.input_layernorm(x), cache)
        x = x + out
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class ToyDecoder(nnx.Module):
    """Embedding, DecoderLayers, final RMSNorm and LM head; one latent cache per layer."""

    def __init__(self, config: ToyConfig, *, rngs: nnx.Rngs):
        hidden = config.attention.hidden_size
        self.embed_tokens = nnx.Embed(config.vocab_size, hidden, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = nnx.RMSNorm(hidden, epsilon=config.attention.rms_norm_eps, rngs=rngs)
        self.lm_head = nnx.Linear(hidden, config.vocab_size, use_bias=False, rngs=rngs)

    def init_caches(self, batch: int, max_seqlen: int, dtype=jnp.bfloat16) -> tuple[PagedKVCache, ...]:
        return tuple(layer.self_attn.init_cache(batch, max_seqlen, dtype=dtype) for layer in self.layers)

    def _run(self, tokens: jax.Array, caches, attend) -> tuple[jax.Array, tuple[PagedKVCache, ...]]:
        x = self.embed_tokens(tokens)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cache, attend)
            new_caches.append(cache)
        return self.lm_head(self.norm(x)), tuple(new_caches)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, caches) -> tuple[jax.Array, tuple[PagedKVCache, ...]]:
        """Logits ``[batch, s, vocab]`` of right-padded prompts ``[batch, s]`` (real tokens:
        ``lengths``), and the caches holding them."""
        return self._run(tokens, caches, lambda attention, h, cache: attention.prefill(h, lengths, cache))

    def decode(self, tokens: jax.Array, caches, implementation: str | None = None):
        """Logits ``[batch, s_new, vocab]`` of the next tokens ``[batch, s_new]``; they are
        appended to the caches."""
        return self._run(tokens, caches, lambda attention, h, cache: attention.decode(h, cache, implementation=implementation))


def create_model(config: ToyConfig, seed: int = 0) -> ToyDecoder:
    """A randomly initialised ToyDecoder, initialised in one compiled program (eager
    initialisation would compile one program per parameter shape)."""
    return nnx.jit(lambda: ToyDecoder(config, rngs=nnx.Rngs(seed)))()


def random_prompts(rng: np.random.Generator, batch: int, vocab: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded random prompts ``[batch, max_len]`` int32 and lengths in
    ``[max_len // 4, max_len]`` (so they differ)."""
    lengths = rng.integers(max(1, max_len // 4), max_len + 1, batch).astype(np.int32)
    lengths[0] = max_len
    tokens = rng.integers(0, vocab, (batch, max_len)).astype(np.int32)
    return np.where(np.arange(max_len) < lengths[:, None], tokens, 0).astype(np.int32), lengths


def make_generator(model: ToyDecoder, new_tokens: int, implementation: str | None = None):
    """Jitted ``prefill(prompts, lengths, caches) -> (first_token [b], caches)`` and
    ``loop(first_token, caches) -> (tokens [b, new_tokens], caches)``: the decode steps in
    one ``lax.scan``, the caches donated."""
    graph, state = nnx.split(model)

    @jax.jit
    def prefill(state, prompts, lengths, caches):
        logits, caches = nnx.merge(graph, state).prefill(prompts, lengths, caches)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last, axis=-1).astype(jnp.int32), caches

    def loop(state, first_token, caches):
        decoder = nnx.merge(graph, state)

        def step(carry, _):
            token, caches = carry
            logits, caches = decoder.decode(token[:, None], caches, implementation)
            token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (token, caches), token

        (_, caches), tokens = jax.lax.scan(step, (first_token, caches), None, length=new_tokens)
        return tokens.T, caches

    donating_loop = jax.jit(loop, donate_argnums=2)
    return (lambda prompts, lengths, caches: prefill(state, jnp.asarray(prompts), jnp.asarray(lengths), caches),
            lambda first_token, caches: donating_loop(state, first_token, caches))


def generate(model: ToyDecoder, prompts, lengths, new_tokens: int, *, implementation: str | None = None,
             cache_dtype=jnp.bfloat16) -> np.ndarray:
    """Greedy tokens ``[batch, 1 + new_tokens]``: the prefill's, then the loop's."""
    prefill, loop = make_generator(model, new_tokens, implementation)
    caches = model.init_caches(len(lengths), prompts.shape[1] + new_tokens, cache_dtype)
    first, caches = prefill(prompts, lengths, caches)
    tokens, _ = loop(first, caches)
    return np.concatenate([np.asarray(first)[:, None], np.asarray(tokens)], axis=1)


def first_difference(a: np.ndarray, b: np.ndarray) -> list[int | None]:
    """Per row, the first column where ``a`` and ``b`` differ (None if they agree)."""
    return [int(np.argmax(x != y)) if (x != y).any() else None for x, y in zip(a, b)]


def teacher_forced_logits(model: ToyDecoder, prompts, lengths, tokens: np.ndarray) -> np.ndarray:
    """float32 logits ``[batch, n, vocab]`` with which the plain path (one prefill over each
    prompt followed by its generated tokens ``[batch, n]``) predicts each of those tokens.

    Greedy decoding through the absorbed path should pick, at every step, a token whose
    plain-path logit is the maximum up to rounding: a near-tie may flip, nothing else.
    """
    batch, n = tokens.shape
    sequences = np.zeros((batch, prompts.shape[1] + n), np.int32)
    for b, length in enumerate(lengths):
        sequences[b, :length] = prompts[b, :length]
        sequences[b, length : length + n] = tokens[b]
    caches = model.init_caches(batch, sequences.shape[1])
    graph, state = nnx.split(model)
    logits, _ = jax.jit(lambda state, *args: nnx.merge(graph, state).prefill(*args))(
        state, sequences, jnp.asarray(lengths + n, jnp.int32), caches)
    positions = np.asarray(lengths)[:, None] - 1 + np.arange(n)
    return np.take_along_axis(np.asarray(logits, np.float32), positions[:, :, None], axis=1)


def logit_gaps(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``max(logits) - logits[token]`` per generated token: 0 where the token is the argmax."""
    return logits.max(axis=-1) - np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]


KV_CACHES = {"bf16": jnp.bfloat16, "fp8": "fp8"}  # --kv-cache: init_cache's dtype


def benchmark(args: argparse.Namespace) -> None:
    implementation = None if args.implementation == "default" else "xla"
    cache_dtype = KV_CACHES[args.kv_cache]
    config = toy_config(args.layers)
    model = create_model(config)
    prompts, lengths = random_prompts(np.random.default_rng(0), args.batch, config.vocab_size, args.prompt_len)
    prefill, loop = make_generator(model, args.new_tokens, implementation)

    times = []
    for _ in range(1 + args.repeats):  # the first run compiles
        caches = model.init_caches(args.batch, args.prompt_len + args.new_tokens, cache_dtype)
        check_capacity(caches[0], lengths + args.new_tokens)
        first, caches = jax.block_until_ready(prefill(prompts, lengths, caches))
        start = time.perf_counter()
        tokens, _ = jax.block_until_ready(loop(first, caches))
        times.append(time.perf_counter() - start)
    loop_s = float(np.median(times[1:]))
    tokens = np.concatenate([np.asarray(first)[:, None], np.asarray(tokens)], axis=1)

    kernel = jax_etap.kernel_available() and implementation is None
    print(f"device:          {jax.devices()[0].device_kind}")
    print(f"attention:       {'CUDA kernel (cuda)' if kernel else 'jnp reference (xla)'}; "
          f"kernel_available() = {jax_etap.kernel_available()}")
    print(f"XLA_FLAGS:       {os.environ.get('XLA_FLAGS', '')!r}")
    print(f"model:           {args.layers} layers, hidden {config.attention.hidden_size}, "
          f"{config.attention.num_attention_heads} heads, latent {config.attention.latent_dim}, vocab {config.vocab_size}")
    print(f"kv cache:        {args.kv_cache}, {caches[0].pages.dtype} pages {tuple(caches[0].pages.shape)}")
    print(f"prompts:         lengths {lengths.tolist()}")
    print(f"decode loop:     {args.new_tokens} steps x batch {args.batch} in {loop_s * 1e3:.1f} ms "
          f"(median of {args.repeats}): {loop_s / args.new_tokens * 1e6:.1f} us/step, "
          f"{args.batch * args.new_tokens / loop_s:.0f} tokens/s")
    print(f"tokens[0][:16]:  {tokens[0, :16].tolist()}")
    gaps = logit_gaps(teacher_forced_logits(model, prompts, lengths, tokens), tokens)
    print(f"vs plain path:   largest logit gap of a chosen token {gaps.max():.2e} (0: always the argmax)")
    if args.compare:
        reference = generate(model, prompts, lengths, args.new_tokens, implementation="xla", cache_dtype=cache_dtype)
        where = first_difference(tokens, reference)
        same = all(w is None for w in where)
        print(f"vs reference:    {'identical greedy tokens' if same else f'first differences per sequence: {where}'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; the others are shorter")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the loop (after one to compile)")
    parser.add_argument("--implementation", choices=["default", "xla"], default="default")
    parser.add_argument("--kv-cache", choices=list(KV_CACHES), default="bf16",
                        help="the latent caches' format: bfloat16, or the 656-byte FP8 layout of jax_etap.fp8")
    parser.add_argument("--compare", action="store_true", help="also run the reference loop and compare tokens")
    parser.add_argument("--command-buffers", choices=["on", "off"], default="on")
    args = parser.parse_args()
    if args.command_buffers == "off":
        # Must happen before jax creates its GPU backend (nothing above has touched it).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    benchmark(args)


if __name__ == "__main__":
    main()
