"""Small DeepSeek-style attention configurations and random checkpoints for the tests.

Each spec is a dict with config.json's field names (read by `MLAConfig.from_hf_config`
and, as plain fields, by the float64 oracle and by transformers). Widths are small so the
CPU tests stay fast, with kv_lora_rank + qk_rope_head_dim a multiple of 64 as
`mla_decode` requires.
"""

from __future__ import annotations

import numpy as np
import pytest

V3_LIKE = dict(  # q LoRA, YaRN with DeepSeek-V3's mscale = mscale_all_dim = 1
    hidden_size=64, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=48, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=24, rope_theta=10000.0, max_position_embeddings=2560,
    attention_bias=False, rms_norm_eps=1e-6,
    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                      mscale=1.0, mscale_all_dim=1.0),
)
V2_LITE_LIKE = dict(  # one q_proj, biases, YaRN with mscale != mscale_all_dim (scales cos/sin too)
    hidden_size=48, num_attention_heads=3, q_lora_rank=None, kv_lora_rank=112, qk_nope_head_dim=8,
    qk_rope_head_dim=16, v_head_dim=8, rope_theta=500.0, max_position_embeddings=512,
    attention_bias=True, rms_norm_eps=1e-6,
    rope_scaling=dict(type="yarn", factor=16.0, original_max_position_embeddings=32, beta_fast=16, beta_slow=2,
                      mscale=0.9, mscale_all_dim=0.7),
)
PLAIN_ROPE = dict(  # no rope scaling, 8 heads
    hidden_size=32, num_attention_heads=8, q_lora_rank=24, kv_lora_rank=56, qk_nope_head_dim=12,
    qk_rope_head_dim=8, v_head_dim=16, rope_theta=10000.0, max_position_embeddings=4096,
    attention_bias=False, rms_norm_eps=1e-6, rope_scaling=None,
)
V3_LATENT = dict(  # DeepSeek-V3's cache row (512 latent + 64 rope: what the FP8 cache holds), few small heads
    hidden_size=128, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=512, qk_nope_head_dim=16,
    qk_rope_head_dim=64, v_head_dim=16, rope_theta=10000.0, max_position_embeddings=163840,
    attention_bias=False, rms_norm_eps=1e-6,
    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                      mscale=1.0, mscale_all_dim=1.0),
)
SPECS = [pytest.param(V3_LIKE, id="v3-like"), pytest.param(V2_LITE_LIKE, id="v2lite-like"),
         pytest.param(PLAIN_ROPE, id="plain-rope")]


def checkpoint_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every attention weight, as stored in the checkpoints ([out, in])."""
    h, hidden = spec["num_attention_heads"], spec["hidden_size"]
    qk = spec["qk_nope_head_dim"] + spec["qk_rope_head_dim"]
    r, dr = spec["kv_lora_rank"], spec["qk_rope_head_dim"]
    shapes = {}
    if spec["q_lora_rank"] is None:
        shapes["q_proj.weight"] = (h * qk, hidden)
    else:
        ql = spec["q_lora_rank"]
        shapes.update({"q_a_proj.weight": (ql, hidden), "q_a_layernorm.weight": (ql,), "q_b_proj.weight": (h * qk, ql)})
        if spec["attention_bias"]:
            shapes["q_a_proj.bias"] = (ql,)
    shapes["kv_a_proj_with_mqa.weight"] = (r + dr, hidden)
    shapes["kv_a_layernorm.weight"] = (r,)
    shapes["kv_b_proj.weight"] = (h * (spec["qk_nope_head_dim"] + spec["v_head_dim"]), r)
    shapes["o_proj.weight"] = (hidden, h * spec["v_head_dim"])
    if spec["attention_bias"]:
        shapes["kv_a_proj_with_mqa.bias"] = (r + dr,)
        shapes["o_proj.bias"] = (hidden,)
    return shapes


def random_checkpoint(rng: np.random.Generator, spec, prefix: str = "") -> dict[str, np.ndarray]:
    """Random float32 weights under the checkpoints' names: Linear ~ N(0, 1/fan_in) (unit
    activations), norm weights ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.1^2)."""
    weights = {}
    for name, shape in checkpoint_shapes(spec).items():
        if name.endswith("layernorm.weight"):
            value = 1 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[prefix + name] = value.astype(np.float32)
    return weights
