// XLA FFI handlers exported by the extension (defined in ffi_handlers.cc).
#pragma once

#include "xla/ffi/api/ffi.h"

// jax_etap_mla_decode_v2: operands (q, kv_cache, cache_seqlens, block_table), results
// (out, lse, and the workspace partial_out, partial_lse, sequence_parts), attributes softmax_scale (f32), causal (bool) and
// portable (bool: run the sm_80 kernel even where the Hopper ETAP kernel applies).
// The target name is an ABI (jax.export stores it): change its signature only under a new name.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEtapMlaDecodeV2);
