"""Which kernel runs a call, and the facts Python shares with the kernels, without a GPU.

The kernel is chosen in one place, csrc/dispatch.cc's `choose_kernel`, which the extension
exports (in the CPU-only build too). The facts both languages need (the d_qk rule, the
workspace's part count, the FFI target name) live in csrc/common/limits.h and reach
Python through `jax_etap._ffi`; these tests check that Python's checks and lowering use
them rather than a copy. Broken on purpose once each while written: the alias dropped
from `_checks.IMPLEMENTATIONS`, and Python's d_qk check made "a multiple of 8".
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jax_etap
from jax_etap import _ffi
from jax_etap._checks import check_implementation

HOPPER = (9, 0)
DEEPSEEK = dict(d_qk=576, d_v=512, block_size=64, num_blocks=1024, portable=False)


def choose(capability=HOPPER, **shape):
    """`choose_kernel` on DeepSeek's shape with 16 query rows per KV head, as overridden."""
    return _ffi.choose_kernel(capability, **{**DEEPSEEK, "rows": 16, **shape})


@pytest.mark.parametrize(
    "overrides,kernel",
    [
        ({}, "etap"),
        (dict(rows=32), "etap"),  # kEtapMaxRows
        (dict(rows=33), "wide"),
        (dict(rows=128), "wide"),
        (dict(d_qk=512), "etap"),  # the latent alone
        (dict(block_size=16), "etap"),  # blocks that tile a 64-key tile
        (dict(block_size=128), "etap"),
        (dict(portable=True), "portable"),  # asked for
        (dict(rows=128, portable=True), "portable"),
        (dict(d_v=256), "portable"),  # the Hopper kernels' value boxes cover 512 channels
        (dict(d_qk=192, d_v=128), "portable"),
        (dict(block_size=4), "portable"),  # a TMA copy of fewer than 8 keys
        (dict(block_size=96), "portable"),  # neither tiles nor is tiled by 64 keys
        (dict(num_blocks=2**26), "portable"),  # tokens past int32: the tensor map cannot address them
        (dict(capability=(8, 0)), "portable"),
        (dict(capability=(8, 9)), "portable"),
        (dict(capability=(10, 0)), "portable"),  # sm_90a code runs on 9.0 only
    ],
)
def test_choose_kernel(overrides, kernel):
    assert choose(**overrides) == kernel


@pytest.mark.parametrize("portable", [False, True])
def test_choose_kernel_refuses_gpus_older_than_ampere(portable):
    """A requested kernel that cannot run raises; nothing falls back."""
    with pytest.raises(ValueError, match=r"compute capability 8\.0 or newer.*7\.5"):
        choose(capability=(7, 5), portable=portable)


def test_head_dim_rule_is_the_extensions():
    """Python accepts exactly the d_qk that the extension (and so the FFI handler) accepts."""
    accepted = []
    for d_qk in range(0, _ffi.MAX_HEAD_DIM + 2 * _ffi.HEAD_DIM_MULTIPLE, 8):
        q = jax.ShapeDtypeStruct((1, 1, 4, d_qk), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((1, 64, 1, d_qk), jnp.bfloat16)
        seqlens = jax.ShapeDtypeStruct((1,), jnp.int32)
        try:
            jax.eval_shape(lambda q, kv, s: jax_etap.mla_decode(q, kv, s, head_dim_v=min(d_qk, 64) or 1), q, kv, seqlens)
        except ValueError as err:
            assert "d_qk" in str(err)
            python_accepts = False
        else:
            python_accepts = True
        assert python_accepts == _ffi.head_dim_supported(d_qk), d_qk
        accepted.append(python_accepts)
    assert any(accepted) and not all(accepted)  # the sweep straddles the rule


def test_etap_is_an_alias_of_cuda():
    assert check_implementation("etap") == check_implementation("cuda") == "cuda"
    with pytest.raises(ValueError, match=r"'cuda'.*got 'cudnn'"):
        check_implementation("cudnn")


def _cuda_lowering(implementation, batch=3):
    q = jax.ShapeDtypeStruct((batch, 1, 16, 576), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, 128, 1, 576), jnp.bfloat16)
    seqlens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    fn = jax.jit(lambda q, kv, s: jax_etap.mla_decode(q, kv, s, implementation=implementation))
    return fn.trace(q, kv, seqlens).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.skipif(not _ffi.WITH_CUDA, reason="jax_etap was built without CUDA: there is no cuda lowering to inspect")
def test_cuda_lowering_uses_the_extensions_facts():
    """The alias lowers to the same kernel call as "cuda"; the call names the extension's
    target, and its workspace has batch + the extension's part count slots."""
    text = _cuda_lowering("cuda")
    assert text == _cuda_lowering("etap")
    (call,) = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert f"@{_ffi.MLA_DECODE_TARGET}(" in call
    slots = 3 + _ffi.MAX_SCHEDULE_PARTS
    assert re.search(rf"tensor<{slots}x1x16x512xf32>", call) and re.search(rf"tensor<{slots}x1x16xf32>", call), call
    assert re.search(r"portable\s*=\s*false", call)


@pytest.mark.skipif(jax_etap.kernel_available(), reason="the kernel can run here")
@pytest.mark.parametrize("implementation", ["cuda", "etap"])
def test_cuda_on_cpu_raises_naming_the_callers_word(implementation):
    q = jnp.zeros((1, 1, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"implementation='{implementation}' cannot run"):
        jax_etap.mla_decode(q, kv, jnp.ones((1,), jnp.int32), head_dim_v=64, implementation=implementation)
