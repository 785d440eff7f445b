"""`jax_etap.flax.MultiHeadLatentAttention` against DeepSeek-V3's formulation.

Every case loads a fresh random checkpoint (`deepseek_cases.random_checkpoint`), prefills
three right-padded prompts of different lengths into a paged cache of 8-token blocks (so
prompts and decode steps cross block boundaries) and decodes five steps, one of them two
tokens at once. Each sequence's outputs are compared with the float64 NumPy oracle
(`numpy_mla_layer`, non-absorbed) run over that sequence's whole token stream.

Tolerances, as relative error norms ||out - ref|| / ||ref|| per sequence and phase:
  * prefill <= 1e-5: it runs in float32 (eps 1.2e-7) over <= 11 tokens and widths <= 112;
    measured 3-4e-7. A wrong rope pair, position, scale or mask gives >= 1e-2.
  * decode <= 1.5e-2 (bfloat16 cache) / 2e-3 (float16 cache): `mla_decode` reads the
    latent rows and the absorbed queries rounded to the cache dtype (2^-9 / 2^-12
    relative per element) and rounds its output once more; measured ~3-4e-3 (bfloat16)
    and ~5e-4 (float16), so the bounds leave ~4x margin and stay an order of magnitude
    below what a wrong absorption, scale or position gives.

The tolerances are float32's: every test here traces under
`jax.default_matmul_precision("highest")`, since on a GPU jax's default precision runs
float32 matmuls in TF32 (the prefill then lands at 8e-4 relative, measured on an H200).

When torch and transformers are importable, the same streams also run through
transformers' DeepseekV3Attention (float64, its own KV cache, one call per prefill and
decode step): the oracle must agree with it to 1e-6 (transformers computes the rotary
angles in float32, ~1e-7 relative) and the module within the tolerances above.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from deepseek_cases import SPECS, V3_LIKE, random_checkpoint  # noqa: E402
from mla_cases import relative_error  # noqa: E402
from numpy_mla_layer import mla_attention_numpy  # noqa: E402

from jax_etap.cache import create_cache  # noqa: E402
from jax_etap.flax import MLAConfig, MultiHeadLatentAttention, load_deepseek_weights  # noqa: E402

PREFILL_RTOL = 1e-5
DECODE_RTOL = {jnp.dtype(jnp.bfloat16): 1.5e-2, jnp.dtype(jnp.float16): 2e-3}
PREFIX = "model.layers.3.self_attn."
LENGTHS = (11, 4, 1)
STEPS = (1, 1, 2, 1, 1)  # tokens per decode call


@pytest.fixture(autouse=True)
def float32_matmuls():
    """Full float32 matmuls (no TF32 on a GPU) for every program a test here traces."""
    with jax.default_matmul_precision("highest"):
        yield


def layer_from_checkpoint(spec, rng):
    """(module, checkpoint without prefix) with the module loaded from a random checkpoint.

    The module is built abstractly (no random init, which would compile one program per
    weight shape), so this also checks that loading fills every parameter.
    """
    module = nnx.eval_shape(lambda: MultiHeadLatentAttention(MLAConfig.from_hf_config(spec), rngs=nnx.Rngs(0)))
    checkpoint = random_checkpoint(rng, spec, PREFIX)
    load_deepseek_weights(module, checkpoint, prefix=PREFIX)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(module))), "a weight was not loaded"
    return module, {k[len(PREFIX):]: v for k, v in checkpoint.items()}


def random_stream(rng, spec):
    """Random hidden states: right-padded prompts [3, 11, hidden] and one [3, n, hidden]
    array per decode call."""
    hidden = spec["hidden_size"]
    prompts = rng.standard_normal((len(LENGTHS), max(LENGTHS), hidden)).astype(np.float32)
    steps = [rng.standard_normal((len(LENGTHS), n, hidden)).astype(np.float32) for n in STEPS]
    return prompts, steps


def jitted(module):
    """The module's prefill(x, lengths, cache) and decode(x, cache), jit-compiled."""
    graph, state = nnx.split(module)
    prefill = jax.jit(lambda state, x, lengths, cache: nnx.merge(graph, state).prefill(x, lengths, cache))
    decode = jax.jit(lambda state, x, cache: nnx.merge(graph, state).decode(x, cache))
    return (lambda x, lengths, cache: prefill(state, jnp.asarray(x), jnp.asarray(lengths, jnp.int32), cache),
            lambda x, cache: decode(state, jnp.asarray(x), cache))


def run_layer(module, prompts, steps, dtype):
    """The module's prefill outputs [3, 11, hidden] and decode outputs [3, sum(STEPS), hidden]
    through a cache of 8-token blocks."""
    prefill, decode = jitted(module)
    cache = module.init_cache(len(LENGTHS), max(LENGTHS) + sum(STEPS), block_size=8, dtype=dtype)
    out, cache = prefill(prompts, LENGTHS, cache)
    decoded = []
    for x in steps:
        y, cache = decode(x, cache)
        decoded.append(np.asarray(y))
    np.testing.assert_array_equal(cache.seqlens, np.asarray(LENGTHS) + sum(STEPS))
    return np.asarray(out), np.concatenate(decoded, axis=1)


def sequence(prompts, steps, b):
    """Sequence b's real hidden states, prompt then decoded tokens: [L_b + sum(STEPS), hidden]."""
    return np.concatenate([prompts[b, : LENGTHS[b]]] + [x[b] for x in steps])


def assert_close_per_sequence(prefill_out, decode_out, expected, dtype):
    """expected[b]: [L_b + sum(STEPS), hidden] reference outputs of sequence b."""
    for b, length in enumerate(LENGTHS):
        err = relative_error(prefill_out[b, :length], expected[b][:length])
        assert err <= PREFILL_RTOL, f"sequence {b}: prefill relative error {err:.2e} > {PREFILL_RTOL}"
        err = relative_error(decode_out[b], expected[b][length:])
        rtol = DECODE_RTOL[jnp.dtype(dtype)]
        assert err <= rtol, f"sequence {b}: decode relative error {err:.2e} > {rtol} ({jnp.dtype(dtype).name} cache)"


@pytest.mark.parametrize("spec, dtype", [pytest.param(*p.values, jnp.bfloat16, id=f"{p.id}-bf16") for p in SPECS]
                         + [pytest.param(V3_LIKE, jnp.float16, id="v3-like-fp16")])
def test_prefill_and_decode_match_float64_oracle(spec, dtype, rng):
    module, checkpoint = layer_from_checkpoint(spec, rng)
    prompts, steps = random_stream(rng, spec)
    prefill_out, decode_out = run_layer(module, prompts, steps, dtype)
    expected = [mla_attention_numpy(checkpoint, spec, sequence(prompts, steps, b)) for b in range(len(LENGTHS))]
    assert_close_per_sequence(prefill_out, decode_out, expected, dtype)


def transformers_outputs(spec, checkpoint, prompts, steps):
    """Per sequence, transformers' DeepseekV3Attention outputs [L_b + sum(STEPS), hidden]
    for the prompt and then each decode step, in float64 through a DynamicCache."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config, DynamicCache
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    config = DeepseekV3Config(**spec, num_key_value_heads=spec["num_attention_heads"], rope_interleave=True)
    config._attn_implementation = "eager"
    attention = hf.DeepseekV3Attention(config, layer_idx=0).double().eval()
    attention.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in checkpoint.items()}, strict=True)
    rotary = hf.DeepseekV3RotaryEmbedding(config).double()
    outputs = []
    for b, length in enumerate(LENGTHS):
        cache, start, chunks = DynamicCache(), 0, []
        for chunk in [prompts[b, :length]] + [x[b] for x in steps]:
            x = torch.from_numpy(chunk[None].astype(np.float64))
            positions = torch.arange(start, start + len(chunk))
            visible = torch.arange(start + len(chunk))[None, :] <= positions[:, None]
            mask = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -torch.inf)
            with torch.no_grad():
                y, _ = attention(x, rotary(x, positions[None]), mask[None, None], cache)
            chunks.append(y[0].numpy())
            start += len(chunk)
        outputs.append(np.concatenate(chunks))
    return outputs


@pytest.mark.parametrize("spec", SPECS)
def test_matches_transformers_deepseek_v3_attention(spec, rng):
    module, checkpoint = layer_from_checkpoint(spec, rng)
    prompts, steps = random_stream(rng, spec)
    expected = transformers_outputs(spec, checkpoint, prompts, steps)
    for b in range(len(LENGTHS)):
        err = relative_error(mla_attention_numpy(checkpoint, spec, sequence(prompts, steps, b)), expected[b])
        assert err <= 1e-6, f"sequence {b}: the float64 oracle differs from transformers by {err:.2e}"
    assert_close_per_sequence(*run_layer(module, prompts, steps, jnp.bfloat16), expected, jnp.bfloat16)


def test_prefill_leaves_length_zero_sequences_untouched(rng):
    """A slot with prompt length 0 keeps its cache (continuous batching refills one slot)."""
    module, _ = layer_from_checkpoint(V3_LIKE, rng)
    prefill, _ = jitted(module)
    hidden = V3_LIKE["hidden_size"]
    cache = module.init_cache(2, 16, block_size=8)
    _, cache = prefill(rng.standard_normal((2, 5, hidden)).astype(np.float32), [5, 3], cache)
    _, refilled = prefill(rng.standard_normal((2, 5, hidden)).astype(np.float32), [0, 2], cache)
    np.testing.assert_array_equal(refilled.seqlens, [5, 2])
    first = np.asarray(cache.block_table[0])
    np.testing.assert_array_equal(refilled.pages[first], cache.pages[first])


def test_softmax_scale_and_rope_factor_follow_deepseek_v3_config():
    """DeepSeek-V3's config.json: scale = 192^-0.5 * (0.1 ln 40 + 1)^2; cos/sin unscaled."""
    v3 = dict(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
              qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000, max_position_embeddings=163840,
              rms_norm_eps=1e-6, attention_bias=False, vocab_size=129280,
              rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096, "type": "yarn"})
    config = MLAConfig.from_hf_config(v3)
    assert config.latent_dim == 576
    assert config.softmax_scale == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2, rel=1e-12)
    assert config.rope_attention_factor == 1.0
    no_scaling = MLAConfig.from_hf_config(dict(v3, rope_scaling=None))
    assert no_scaling.rope_scaling is None and no_scaling.softmax_scale == pytest.approx(192**-0.5)


def test_cache_width_must_suit_mla_decode():
    with pytest.raises(ValueError, match="kv_lora_rank \\+ qk_rope_head_dim = 100"):
        MultiHeadLatentAttention(MLAConfig.from_hf_config(dict(V3_LIKE, kv_lora_rank=84)), rngs=nnx.Rngs(0))


def test_bad_inputs_name_the_argument(rng):
    module, _ = layer_from_checkpoint(V3_LIKE, rng)
    x = jnp.asarray(rng.standard_normal((2, 1, V3_LIKE["hidden_size"])), jnp.float32)
    with pytest.raises(ValueError, match=r"cache.pages must be \[num_blocks, block_size, 1, 64\]"):
        module.decode(x, create_cache(2, 8, head_dim=128))
    with pytest.raises(ValueError, match="x must have shape"):
        module.decode(x[:, :, :10], module.init_cache(2, 8))
    with pytest.raises(TypeError, match="cache must be"):
        module.decode(x, (1, 2, 3))
    with pytest.raises(ValueError, match=r"lengths must be integers of shape \[batch=2\]"):
        module.prefill(x, jnp.array([1.0, 1.0]), module.init_cache(2, 8))


def test_load_weights_rejects_missing_unexpected_and_misshaped(rng):
    module, checkpoint = layer_from_checkpoint(V3_LIKE, rng)
    before = np.asarray(module.o_proj.kernel[...])
    fresh = random_checkpoint(rng, V3_LIKE)
    del fresh["kv_b_proj.weight"]
    fresh["kv_b_proj.weight_scale_inv"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"missing \['kv_b_proj.weight'\], unexpected \['kv_b_proj.weight_scale_inv'\]"):
        load_deepseek_weights(module, fresh)
    fresh = random_checkpoint(rng, V3_LIKE)
    fresh["kv_b_proj.weight"] = fresh["kv_b_proj.weight"].T
    with pytest.raises(ValueError, match=r"kv_b_proj.weight has shape \(48, 160\), the module expects \(160, 48\)"):
        load_deepseek_weights(module, fresh)
    np.testing.assert_array_equal(module.o_proj.kernel[...], before)  # nothing was modified
    np.testing.assert_array_equal(module.o_proj.kernel[...], checkpoint["o_proj.weight"].T)


def test_import_jax_etap_does_not_import_flax():
    code = "import sys, jax_etap, jax_etap.cache; assert 'flax' not in sys.modules, 'flax was imported'"
    subprocess.run([sys.executable, "-P", "-c", code], check=True)
