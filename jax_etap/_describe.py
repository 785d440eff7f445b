"""How error messages name a value: its shape and dtype, or its type where it is no array."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def describe(x: Any) -> str:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return type(x).__name__
    return f"shape {tuple(x.shape)} and dtype {jnp.dtype(x.dtype).name}"
