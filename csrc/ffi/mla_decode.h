// The XLA FFI handler exported by the extension (defined in ffi/mla_decode.cc).
#pragma once

#include "xla/ffi/api/ffi.h"

// Target kMlaDecodeTarget (common/limits.h): operands (q, kv_cache, cache_seqlens,
// block_table), results (out, lse, and the workspace partial_out, partial_lse,
// sequence_parts), attributes softmax_scale (f32), causal (bool) and portable (bool: run
// the portable kernel even where a Hopper kernel applies). The target name is an ABI
// (jax.export stores it): change its signature only under a new name.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEtapMlaDecodeV2);
