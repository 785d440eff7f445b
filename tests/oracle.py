"""An independent float64 NumPy implementation of MLA decode: the tests' oracle."""

from __future__ import annotations

import numpy as np


def mla_decode_oracle(q, kv_cache, seqlens, block_table, *, head_dim_v, softmax_scale=None, causal=False):
    """Loops over sequences; inputs are NumPy arrays (q and cache already rounded to their dtype)."""
    q = np.asarray(q, np.float64)
    kv = np.asarray(kv_cache, np.float64)
    batch, s_q, h_q, d = q.shape
    h_kv = kv.shape[2]
    groups = h_q // h_kv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    out = np.zeros((batch, s_q, h_q, head_dim_v))
    lse = np.full((batch, h_q, s_q), -np.inf)
    for b in range(batch):
        if block_table is None:
            capacity = kv.shape[1]
            length = int(np.clip(seqlens[b], 0, capacity))
            keys = kv[b, :length]
        else:
            bs = kv.shape[1]
            capacity = block_table.shape[1] * bs
            length = int(np.clip(seqlens[b], 0, capacity))
            used = block_table[b, : -(-length // bs)]
            if np.any((used < 0) | (used >= kv.shape[0])):
                out[b], lse[b] = np.nan, np.nan
                continue
            keys = kv[used].reshape(-1, h_kv, d)[:length]
        for s in range(s_q):
            visible = length - s_q + 1 + s if causal else length
            if visible <= 0:
                continue
            k = keys[:visible]  # [visible, h_kv, d]
            for h in range(h_q):
                kh = k[:, h // groups]
                scores = kh @ q[b, s, h] * scale
                m = scores.max()
                w = np.exp(scores - m)
                out[b, s, h] = w @ kh[:, :head_dim_v] / w.sum()
                lse[b, h, s] = m + np.log(w.sum())
    return out, lse


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
