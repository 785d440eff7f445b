"""Loading a DeepSeek checkpoint's attention weights into `MultiHeadLatentAttention`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_etap.flax.attention import MultiHeadLatentAttention

_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_NORMS = ("q_a_layernorm", "kv_a_layernorm")


def _targets(module: MultiHeadLatentAttention) -> dict[str, tuple[nnx.Variable, bool]]:
    """Checkpoint name (without prefix) -> (the module's variable, whether to transpose)."""
    targets = {}
    for name in _LINEARS:
        layer = getattr(module, name, None)
        if layer is None:
            continue
        targets[f"{name}.weight"] = (layer.kernel, True)  # checkpoints store Linear as [out, in]
        if layer.bias is not None:
            targets[f"{name}.bias"] = (layer.bias, False)
    for name in _NORMS:
        norm = getattr(module, name, None)
        if norm is not None:
            targets[f"{name}.weight"] = (norm.scale, False)
    return targets


def load_deepseek_weights(module: MultiHeadLatentAttention, state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Copies a DeepSeek checkpoint's attention weights into ``module`` in place.

    Args:
      module: the layer to fill.
      state_dict: checkpoint name -> array (NumPy, jax, or anything ``np.asarray``
        accepts; convert bfloat16 torch tensors with ``.float().numpy()``). Names are those
        of the public checkpoints and transformers, e.g.
        ``model.layers.0.self_attn.kv_b_proj.weight``; Linear weights are ``[out, in]``.
        FP8 checkpoints must be dequantized first (their ``weight_scale_inv`` entries are
        rejected as unexpected).
      prefix: prepended to every name, e.g. ``"model.layers.0.self_attn."``.

    Every weight the module has must be present with the checkpoint's shape, and every
    name in ``state_dict`` that starts with ``prefix`` must be one of them; otherwise
    ValueError, listing the offending names, before anything is modified. Values are cast
    to the module's parameter dtype.

    To skip the random initialisation of weights that are about to be replaced, build the
    module abstractly: ``nnx.eval_shape(lambda: MultiHeadLatentAttention(config,
    rngs=nnx.Rngs(0)))`` gives one whose parameters are shapes only, and loading fills
    them all.
    """
    targets = _targets(module)
    missing = sorted(prefix + name for name in targets if prefix + name not in state_dict)
    unexpected = sorted(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in targets)
    if missing or unexpected:
        raise ValueError(f"load_deepseek_weights (prefix {prefix!r}): missing {missing}, unexpected {unexpected}")
    values = {}
    for name, (variable, transpose) in targets.items():
        value = np.asarray(state_dict[prefix + name])
        value = value.T if transpose else value
        if value.shape != variable.shape:
            stored = value.shape[::-1] if transpose else value.shape
            expected = variable.shape[::-1] if transpose else variable.shape
            raise ValueError(f"{prefix + name} has shape {stored}, the module expects {expected}")
        values[name] = jnp.asarray(value, variable.dtype)
    for name, (variable, _) in targets.items():
        variable.set_value(values[name])  # also fills a module built by nnx.eval_shape
