"""The configuration of a DeepSeek-V2/V3 attention layer, with DeepSeek-V3's field names.

Field names and meanings follow the checkpoints' ``config.json``; `MLAConfig.from_hf_config`
reads such a dict. The two derived quantities that depend on YaRN scaling are defined
here: the softmax scale and the factor applied to the rotary cos/sin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature correction ``0.1 * mscale * ln(factor) + 1`` (1 if factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension, as in DeepSeek-V3's ``rope_scaling`` (``"type": "yarn"``).

    factor: None means ``max_position_embeddings / original_max_position_embeddings``.
    mscale, mscale_all_dim: the defaults are those of DeepSeek's own modeling code (1 and
      0); DeepSeek-V3 sets both to 1, DeepSeek-V2-Lite both to 0.707.
    """

    factor: float | None = None
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention hyperparameters (DeepSeek-V3 names; V3's values in brackets).

    hidden_size [7168], num_attention_heads [128]; q_lora_rank [1536] (None: queries are
    one projection ``q_proj``, as in DeepSeek-V2-Lite); kv_lora_rank [512], the latent
    width; qk_nope_head_dim [128] and qk_rope_head_dim [64], the two parts of a query/key
    head; v_head_dim [128]; rope_theta [10000]; rope_scaling [YaRN, factor 40 over 4096
    positions] or None; rms_norm_eps [1e-6] (the decoder's norms; DeepSeek's latent norms
    inside attention always use 1e-6); max_position_embeddings [163840]; attention_bias
    [False] (biases on q_a_proj, kv_a_proj_with_mqa and o_proj).
    """

    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = False

    def __post_init__(self) -> None:
        sizes = ["hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "max_position_embeddings"]
        if self.q_lora_rank is not None:
            sizes.append("q_lora_rank")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MLAConfig.{name} must be a positive int, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnScaling):
            raise TypeError(f"MLAConfig.rope_scaling must be a YarnScaling or None, got {type(self.rope_scaling).__name__}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of a cache row: the kv_lora_rank latent followed by the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn_factor(self) -> float:
        scaling = self.rope_scaling
        if scaling is None:
            return 1.0
        if scaling.factor is None:
            return self.max_position_embeddings / scaling.original_max_position_embeddings
        return float(scaling.factor)

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``yarn_mscale(factor, mscale_all_dim) ** 2`` under YaRN
        when mscale_all_dim is non-zero (DeepSeek's rule)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            scale *= yarn_mscale(self.yarn_factor, self.rope_scaling.mscale_all_dim) ** 2
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """What YaRN multiplies the rotary cos and sin by:
        ``yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)`` (1 for V3)."""
        if self.rope_scaling is None:
            return 1.0
        factor = self.yarn_factor
        return yarn_mscale(factor, self.rope_scaling.mscale) / yarn_mscale(factor, self.rope_scaling.mscale_all_dim)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "MLAConfig":
        """The attention part of a DeepSeek ``config.json`` (as a dict).

        Reads ``rope_scaling`` (checkpoints) or ``rope_parameters`` (newer transformers);
        rope_theta may sit at the top level or inside the latter. Only YaRN (or no)
        scaling is supported.
        """
        scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
        rope_type = scaling.get("type", scaling.get("rope_type", "default"))
        if rope_type not in ("yarn", "default"):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (only 'yarn')")
        yarn = None
        if rope_type == "yarn":
            fields = {f.name for f in dataclasses.fields(YarnScaling)}
            yarn = YarnScaling(**{k: v for k, v in scaling.items() if k in fields and v is not None})
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta"}
        return cls(
            **{k: config[k] for k in names if k in config},
            rope_theta=float(config.get("rope_theta", scaling.get("rope_theta", 10000.0))),
            rope_scaling=yarn,
        )
