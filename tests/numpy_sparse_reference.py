"""The tests' oracle for sparse decode: float64 NumPy, written from the specification alone.

It shares no code with `jax_etap` (in particular not `jax_etap.sparse_reference`). It
loops over query rows and builds each row's list of selected tokens with Python, so a
token it does not select is never touched, and the sink is applied with the formula of
the specification as written.

Semantics (the spec of `jax_etap.mla_decode_sparse`):
  * the cache is seen as tokens ``[num_blocks * block_size, d_qk]``; index v names token v.
  * row (b, i) uses the first n = clip(topk_length[b], 0, topk) entries of indices[b, i]
    (all topk without topk_length); -1 entries select nothing; an entry named twice is
    selected twice.
  * if a used entry other than -1 lies outside [0, num_tokens), every out and lse value of
    row (b, i) is NaN.
  * a row that selects nothing: out 0, lse -inf (whatever the sink).
  * otherwise softmax over the selected tokens of softmax_scale * q.k (K = all d_qk
    channels, V = the first head_dim_v; softmax_scale None means d_qk ** -0.5); lse is the
    natural log of the softmax's sum; with a sink, out *= exp(lse) / (exp(lse) + exp(sink)).
"""

from __future__ import annotations

import numpy as np


def mla_decode_sparse_numpy(
    q, kv_cache, indices, *, topk_length=None, attn_sink=None, head_dim_v=512, softmax_scale=None
):
    """float64 (out [b, s_q, h_q, head_dim_v], lse [b, h_q, s_q]) from NumPy inputs.

    q and kv_cache should hold the values the implementation sees (already rounded to
    bfloat16/float16, passed e.g. as float32); they are widened to float64 here. The
    sink's formula is evaluated as written, so |lse| must stay below ~700 (exp overflows).
    """
    q = np.asarray(q, np.float64)
    kv = np.asarray(kv_cache, np.float64)
    indices = np.asarray(indices, np.int64)
    batch, s_q, h_q, d_qk = q.shape
    num_blocks, block_size, one_head, _ = kv.shape
    assert one_head == 1 and kv.shape[3] == d_qk and head_dim_v <= d_qk
    tokens = kv.reshape(num_blocks * block_size, d_qk)
    topk = indices.shape[2]
    scale = d_qk**-0.5 if softmax_scale is None else float(softmax_scale)

    out = np.zeros((batch, s_q, h_q, head_dim_v), np.float64)
    lse = np.full((batch, h_q, s_q), -np.inf, np.float64)
    for b in range(batch):
        n = topk if topk_length is None else min(max(int(topk_length[b]), 0), topk)
        for i in range(s_q):
            chosen = [int(v) for v in indices[b, i, :n] if v != -1]
            if any(not 0 <= v < len(tokens) for v in chosen):
                out[b, i] = np.nan
                lse[b, :, i] = np.nan
                continue
            if not chosen:
                continue  # out stays 0, lse -inf
            k = tokens[chosen]  # [n_chosen, d], a repeated token appears twice
            with np.errstate(invalid="ignore", over="ignore"):
                scores = q[b, i] @ k.T * scale  # [h_q, n_chosen]
                m = scores.max(axis=-1, keepdims=True)
                w = np.exp(scores - m)
                z = w.sum(axis=-1)
                row_lse = m[:, 0] + np.log(z)
                o = (w @ k[:, :head_dim_v]) / z[:, None]
                if attn_sink is not None:
                    sink = np.asarray(attn_sink, np.float64)
                    o = o * (np.exp(row_lse) / (np.exp(row_lse) + np.exp(sink)))[:, None]
            out[b, i] = o
            lse[b, :, i] = row_lse
    return out, lse
