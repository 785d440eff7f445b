"""What mla_decode lowers to, per platform, inspected without a GPU.

For the cuda platform the call must become the kernel's XLA FFI custom call and nothing of
the jnp reference; for cpu (and for implementation="xla" anywhere) it must be the
reference and no custom call. The markers of the reference are ops its softmax and
matmuls lower to (exponential, dot_general, and the gather of the paged cache); each
test asserts they ARE present in the cpu lowering so that their absence from the cuda
lowering means something.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from mla_cases import make_case

import jax_etap

pytestmark = pytest.mark.skipif(
    not jax_etap.build_info()["cuda"], reason="jax_etap was built without CUDA: there is no cuda lowering to inspect"
)

TARGET = re.compile(r"stablehlo\.custom_call\s+@([\w.]*jax_etap_mla_decode[\w.]*)")
REFERENCE_MARKERS = ("stablehlo.exponential", "stablehlo.dot_general")


def _lower(case, platform, *, vmapped=False, **kwargs):
    """StableHLO text of jit(mla_decode) on the case, lowered for ``platform``.

    vmapped: mapped over a leading axis of 2 of q, cache_seqlens and block_table (the
    cache shared), which exercises the batching rule before lowering.
    """
    kwargs = dict(case.kwargs, **kwargs)
    paged = case.block_table is not None
    args = list(case.args if paged else case.args[:3])

    def f(q, kv, s, t=None):
        return jax_etap.mla_decode(q, kv, s, t, **kwargs)

    if vmapped:
        in_axes = (0, None, 0, 0)[: len(args)]
        f = jax.vmap(f, in_axes=in_axes)
        args = [a if axis is None else jax.numpy.stack([a, a]) for a, axis in zip(args, in_axes)]
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _custom_calls(text):
    return TARGET.findall(text)


def _scale_attribute(text):
    m = re.search(r"softmax_scale\s*=\s*([-+0-9.eE]+)", text)
    assert m, "the custom call carries no softmax_scale attribute"
    return float(m.group(1))


CASES = [
    pytest.param(dict(seqlens=(50, 300), s_q=2, h_q=16, causal=True), {}, id="paged-causal"),
    pytest.param(dict(seqlens=(50, 300), s_q=1, h_q=16, block_size=None), {}, id="dense"),
    pytest.param(dict(seqlens=(5,), h_q=4, h_kv=2, d_qk=128, head_dim_v=64, block_size=16, dtype=np.float16), dict(softmax_scale=0.3), id="fp16-gqa-scale"),
]


@pytest.mark.parametrize("vmapped", [False, True], ids=["plain", "vmap"])
@pytest.mark.parametrize("spec,kwargs", CASES)
@pytest.mark.parametrize("implementation", [None, "etap", "portable"], ids=["default", "etap", "portable"])
def test_cuda_lowering_is_the_kernel_call(rng, spec, kwargs, implementation, vmapped):
    case = make_case(rng, **spec)
    cpu = _lower(case, "cpu", vmapped=vmapped, **kwargs)  # implementation=None: the reference on cpu
    cuda = _lower(case, "cuda", vmapped=vmapped, implementation=implementation, **kwargs)
    for marker in REFERENCE_MARKERS:
        assert marker in cpu, f"{marker} should be in the cpu lowering (else the check below is vacuous)"
        assert marker not in cuda, f"the cuda lowering holds the reference's {marker}"
    if case.block_table is not None:
        assert "stablehlo.gather" in cpu and "stablehlo.gather" not in cuda
    assert not _custom_calls(cpu), "the cpu lowering calls the CUDA kernel"
    targets = _custom_calls(cuda)
    assert len(targets) == 1, f"expected one kernel custom call, found {targets}"
    assert targets[0] in jax_etap.build_info()["ffi_targets"]
    # The static arguments reach the kernel.
    causal = kwargs.get("causal", case.causal)
    assert re.search(rf"causal\s*=\s*{str(causal).lower()}\b", cuda), "causal attribute missing or wrong"
    scale = kwargs.get("softmax_scale") or case.q.shape[-1] ** -0.5
    np.testing.assert_allclose(_scale_attribute(cuda), scale, rtol=1e-6)
    portable = implementation == "portable"
    assert re.search(rf"portable\s*=\s*{str(portable).lower()}\b", cuda), "portable attribute missing or wrong"


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_xla_implementation_on_cuda_is_the_reference(rng, spec, kwargs):
    case = make_case(rng, **spec)
    cuda = _lower(case, "cuda", implementation="xla", **kwargs)
    assert not _custom_calls(cuda), "implementation='xla' must not call the kernel"
    assert "custom_call" not in cuda
    for marker in REFERENCE_MARKERS:
        assert marker in cuda


def test_cuda_lowering_output_types(rng):
    """The custom call's first two results are out [b, s_q, h_q, dv] in q's dtype and lse [b, h_q, s_q] f32."""
    case = make_case(rng, seqlens=(3, 9, 27), s_q=3, h_q=8, d_qk=192, head_dim_v=160, causal=True)
    cuda = _lower(case, "cuda")
    line = next(line for line in cuda.splitlines() if _custom_calls(line))
    results = line.rsplit("->", 1)[1]
    assert "tensor<3x3x8x160xbf16>" in results and "tensor<3x8x3xf32>" in results
    main = next(line for line in cuda.splitlines() if "func.func public @main" in line)
    assert "tensor<3x3x8x160xbf16>" in main and "tensor<3x8x3xf32>" in main
