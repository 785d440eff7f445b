"""The tests' oracle for DeepSeek-V3 attention: float64 NumPy, non-absorbed, one sequence.

Written from the DeepSeek-V2/V3 papers and DeepSeek's reference inference code, sharing
no code with `jax_etap.flax`: queries from q_a_proj -> RMSNorm -> q_b_proj (or q_proj),
keys/values from the compressed latent via kv_b_proj, the rope part rotated as complex
numbers (channel pairs (2j, 2j+1) = real, imaginary), YaRN frequency blending, and the
softmax scale qk_head_dim^-0.5 * mscale^2.

Weights are a dict with the checkpoints' names (Linear weights [out, in]); ``spec`` is a
plain dict with DeepSeek config.json's field names and ``rope_scaling`` as in
config.json (or None).
"""

from __future__ import annotations

import math

import numpy as np


def _rms_norm(x, weight, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _linear(weights, name, x):
    y = x @ weights[f"{name}.weight"].T
    bias = weights.get(f"{name}.bias")
    return y if bias is None else y + bias


def _mscale(factor, m):
    return 1.0 if factor <= 1 else 1.0 + 0.1 * m * math.log(factor)


def rotation(spec, positions):
    """Complex rotation factors [len(positions), rope/2] (YaRN magnitude included)."""
    d = spec["qk_rope_head_dim"]
    theta = spec["rope_theta"]
    freqs = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    magnitude = 1.0
    ys = spec.get("rope_scaling")
    if ys:
        factor = ys["factor"]
        orig = ys["original_max_position_embeddings"]
        # pair j completes orig * freqs[j] / (2 pi) rotations over the original context
        def dim_of(rot):
            return d * math.log(orig / (2 * math.pi * rot)) / (2 * math.log(theta))
        lo = max(0, math.floor(dim_of(ys["beta_fast"])))
        hi = min(d - 1, math.ceil(dim_of(ys["beta_slow"])))
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(d // 2) - lo) / (hi - lo), 0, 1)
        freqs = ramp * (freqs / factor) + (1 - ramp) * freqs
        magnitude = _mscale(factor, ys.get("mscale", 1.0)) / _mscale(factor, ys.get("mscale_all_dim", 0.0))
    return magnitude * np.exp(1j * np.outer(np.asarray(positions, np.float64), freqs))


def _rotate(x, rot):
    """x [..., s, (h,) d] real with interleaved pairs; rot [s, d/2]."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * (rot if z.ndim == 2 else rot[:, None, :])
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def softmax_scale(spec):
    scale = (spec["qk_nope_head_dim"] + spec["qk_rope_head_dim"]) ** -0.5
    ys = spec.get("rope_scaling")
    if ys and ys.get("mscale_all_dim"):
        scale *= _mscale(ys["factor"], ys["mscale_all_dim"]) ** 2
    return scale


def latent_rows_numpy(weights, spec, x, positions):
    """float64 cache rows [s, kv_lora_rank + qk_rope_head_dim] of x [s, hidden] at
    ``positions``: the normalized latent, then the rotated k_pe."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    r = spec["kv_lora_rank"]
    compressed = _linear(w, "kv_a_proj_with_mqa", np.asarray(x, np.float64))
    c = _rms_norm(compressed[:, :r], w["kv_a_layernorm.weight"])
    return np.concatenate([c, _rotate(compressed[:, r:], rotation(spec, positions))], axis=-1)


def mla_attention_numpy(weights, spec, x, rows=None):
    """float64 output [s, hidden] of the attention layer for one sequence x [s, hidden]
    at positions 0..s-1, every token attending to itself and all earlier ones.

    rows: None, or the cache rows [s, kv_lora_rank + qk_rope_head_dim] (normalized latent,
    then rotated k_pe) that the keys and values come from instead of those computed from
    x: for example the rows an FP8 cache reads back.
    """
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    x = np.asarray(x, np.float64)
    s = x.shape[0]
    h, dn, dr, dv, r = (spec[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                         "v_head_dim", "kv_lora_rank"))
    if spec["q_lora_rank"] is None:
        q = _linear(w, "q_proj", x)
    else:
        q = _linear(w, "q_b_proj", _rms_norm(_linear(w, "q_a_proj", x), w["q_a_layernorm.weight"]))
    q = q.reshape(s, h, dn + dr)
    rot = rotation(spec, np.arange(s))
    q_nope, q_pe = q[..., :dn], _rotate(q[..., dn:], rot)

    rows = latent_rows_numpy(weights, spec, x, np.arange(s)) if rows is None else np.asarray(rows, np.float64)
    c, k_pe = rows[:, :r], rows[:, r:]  # one rope key shared by all heads
    kv = (c @ w["kv_b_proj.weight"].T).reshape(s, h, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]

    scores = (np.einsum("qhd,khd->hqk", q_nope, k_nope) + np.einsum("qhd,kd->hqk", q_pe, k_pe)) * softmax_scale(spec)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", p, v).reshape(s, h * dv)
    return _linear(w, "o_proj", out)
