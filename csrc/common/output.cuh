// Where a query row's inputs and results live: its offsets in q, out and lse, and the
// final-or-partial destination of a piece's result.
#pragma once

#include <cstdint>

#include "common/numeric.cuh"
#include "common/params.h"
#include "common/schedule.cuh"

namespace jax_etap {

// The query behind packed row r of KV head `kv_head`: position r / groups of head
// kv_head * groups + r % groups. Gives its offsets in q, out and lse.
struct QueryRow {
  int s, h;

  __device__ QueryRow(const MlaDecodeParams& p, int kv_head, int row)
      : s(row / p.groups), h(kv_head * p.groups + row % p.groups) {}
  __device__ int64_t q_offset(const MlaDecodeParams& p, int b) const {
    return ((int64_t(b) * p.s_q + s) * p.h_q + h) * p.d_qk;
  }
  __device__ int64_t out_offset(const MlaDecodeParams& p, int b) const {
    return ((int64_t(b) * p.s_q + s) * p.h_q + h) * p.d_v;
  }
  __device__ int64_t lse_offset(const MlaDecodeParams& p, int b) const { return (int64_t(b) * p.h_q + h) * p.s_q + s; }
};

// Where a piece's result for packed query row `row` of KV head `kv_head` goes: the final
// out/lse of a whole sequence, or the piece's partial slot.
template <typename T>
struct RowResult {
  T* out;             // final output row (whole pieces)
  float* lse;
  float* partial;     // partial slot row (split pieces)
  float* partial_lse;
  bool whole;

  __device__ RowResult(const MlaDecodeParams& p, const Piece& piece, int kv_head, int row)
      : RowResult(p, piece, kv_head, row, QueryRow(p, kv_head, row)) {}
  // With the row's query already found (its two divisions done once, not per store).
  __device__ RowResult(const MlaDecodeParams& p, const Piece& piece, int kv_head, int row, const QueryRow& query)
      : whole(piece.whole) {
    out = static_cast<T*>(p.out) + query.out_offset(p, piece.b);
    lse = p.lse + query.lse_offset(p, piece.b);
    const int64_t partial_row = (int64_t(piece.slot) * p.h_kv + kv_head) * p.rows + row;
    partial = p.partial_out + partial_row * p.d_v;
    partial_lse = p.partial_lse + partial_row;
  }
  __device__ void store(int v, float value) const {
    if (whole) out[v] = from_float<T>(value);
    else partial[v] = value;
  }
  // Channels v and v + 1 (v even) in one store.
  __device__ void store_pair(int v, float a, float b) const {
    struct alignas(2 * sizeof(T)) Pair {
      T x, y;
    };
    if (whole) *reinterpret_cast<Pair*>(out + v) = Pair{from_float<T>(a), from_float<T>(b)};
    else *reinterpret_cast<float2*>(partial + v) = make_float2(a, b);
  }
  __device__ void store_lse(float value) const { *(whole ? lse : partial_lse) = value; }
};

}  // namespace jax_etap
