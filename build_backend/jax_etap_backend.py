"""The build backend: scikit-build-core's, plus NVIDIA's compiler wheels on request.

``JAX_ETAP_CUDA=wheels pip install .`` builds the CUDA kernels on a machine without a CUDA
toolkit: this backend adds the CUDA 13.0 compiler, its headers and the static runtime from
the package registry to the build's own environment, and CMake takes nvcc from there
(cmake/cuda_from_wheels.cmake). Every other value of JAX_ETAP_CUDA builds as scikit-build-core
alone would.
"""

from __future__ import annotations

import os

from scikit_build_core.build import *  # noqa: F403 - the PEP 517 hooks this backend does not change
from scikit_build_core.build import get_requires_for_build_editable as _requires_editable
from scikit_build_core.build import get_requires_for_build_wheel as _requires_wheel

# CUDA 13.0, the release the kernels are tested with: its SASS runs on any driver of the
# 580 series or newer, and 13.0's runtime needs no newer driver than that.
CUDA_COMPILER_WHEELS = [
    "nvidia-cuda-nvcc==13.0.*",
    "nvidia-nvvm==13.0.*",
    "nvidia-cuda-crt==13.0.*",
    "nvidia-cuda-runtime==13.0.*",
    "nvidia-cuda-cccl==13.0.*",
]


def _compiler_wheels() -> list[str]:
    return CUDA_COMPILER_WHEELS if os.environ.get("JAX_ETAP_CUDA", "").lower() == "wheels" else []


def get_requires_for_build_wheel(config_settings=None):
    return [*_requires_wheel(config_settings), *_compiler_wheels()]


def get_requires_for_build_editable(config_settings=None):
    return [*_requires_editable(config_settings), *_compiler_wheels()]
