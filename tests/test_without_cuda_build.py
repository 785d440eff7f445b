"""An extension built without CUDA, on a GPU: the default implementation runs the jnp
reference with a RuntimeWarning, and asking for a kernel is an error, never a silent
fallback. Inspected by lowering for the cuda platform on any machine, with the
extension's CUDA flag patched off.

Broken on purpose once: with the warning removed from _lowering._cuda_lowering, the first
test failed (no RuntimeWarning); with its `_insists_on_kernel` check removed, the second
failed (the "cuda" request lowered to the reference)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from mla_cases import make_case

import jax_etap
from jax_etap import _ffi

TARGET = re.compile(r"stablehlo\.custom_call\s+@[\w.]*jax_etap_mla_decode")


@pytest.fixture
def built_without_cuda(monkeypatch):
    monkeypatch.setattr(_ffi, "WITH_CUDA", False)


def _lower_for_cuda(implementation):
    case = make_case(np.random.default_rng(0), seqlens=(40, 130), s_q=1, h_q=16)
    fn = lambda *a: jax_etap.mla_decode(*a, **case.kwargs, implementation=implementation)  # noqa: E731
    return jax.jit(fn).trace(*case.args).lower(lowering_platforms=("cuda",)).as_text()


def test_default_runs_the_reference_and_warns(built_without_cuda):
    with pytest.warns(RuntimeWarning, match="built without CUDA"):
        text = _lower_for_cuda(None)
    assert not TARGET.search(text)
    assert "stablehlo.exponential" in text  # the reference's softmax


@pytest.mark.parametrize("implementation", ["cuda", "etap", "portable"])
def test_asking_for_a_kernel_is_an_error(built_without_cuda, implementation):
    with pytest.raises(ValueError, match=f"implementation={implementation!r} cannot run: the extension was built without CUDA"):
        _lower_for_cuda(implementation)
