// XLA FFI handlers exported by the extension (defined in ffi_handlers.cc).
#pragma once

#include "xla/ffi/api/ffi.h"

// jax_etap_mla_decode_v1: operands (q, kv_cache, cache_seqlens, block_table), results
// (out, lse, partial_out, partial_lse), attributes softmax_scale (f32) and causal (bool).
// The target name is an ABI (jax.export stores it): change its signature only under a new name.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEtapMlaDecodeV1);
