"""Shared fixtures of the jax_etap test suite.

Run with ``pytest`` (or ``python -P -m pytest``) from the repository root, so that the
installed package (with its compiled extension) is imported rather than the source tree.
"""

from __future__ import annotations

import os
import zlib

# Speed, not semantics: on a GPU, XLA autotunes every matmul of every compilation, which
# makes compiling the jnp reference (done for most test cases, each with new shapes) take
# 3-9 s instead of ~0.5 s on an H100. The CUDA kernel is a custom call and is unaffected.
# Set before jax initialises a backend; a level given in XLA_FLAGS by the caller wins.
if "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()

import jax
import numpy as np
import pytest

import jax_etap


try:
    from hypothesis import settings as _hypothesis_settings

    # Every run draws the same examples, so that a CI failure reproduces; a failing
    # example's blob is printed too (@reproduce_failure).
    _hypothesis_settings.register_profile("reproducible", derandomize=True, print_blob=True)
    _hypothesis_settings.load_profile("reproducible")
except ImportError:  # the property tests skip without hypothesis
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs the CUDA kernel (jax_etap.kernel_available())")
    config.addinivalue_line("markers", "slow: a long case (tens of thousands of keys)")


def pytest_report_header(config):
    return [
        f"jax {jax.__version__}, default backend {jax.default_backend()}, devices {jax.devices()}",
        f"jax_etap {jax_etap.__version__} from {jax_etap.__file__}: build_info {jax_etap.build_info()}",
    ]


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded per test (stable across runs, different for every test id)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


KERNEL = jax_etap.kernel_available()

# Implementations whose results must follow the spec on the default backend: the jnp
# reference always, the default choice (the kernel on a CUDA GPU), and the two CUDA
# kernels ("etap": the best for the GPU and shape; "portable": the sm_80 kernel) where
# they can run.
IMPLEMENTATIONS = [
    pytest.param("xla", id="xla"),
    pytest.param(None, id="default"),
    pytest.param("etap", id="etap", marks=pytest.mark.skipif(not KERNEL, reason="the CUDA kernel cannot run here")),
    pytest.param("portable", id="portable", marks=pytest.mark.skipif(not KERNEL, reason="the CUDA kernel cannot run here")),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    return request.param
