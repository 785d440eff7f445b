import pytest

import jax_etap

# Every implementation is checked against the same float64 oracle; the kernel only where it can run.
IMPLEMENTATIONS = [
    "xla",
    pytest.param("etap", marks=pytest.mark.skipif(not jax_etap.kernel_available(), reason="needs a CUDA GPU and the CUDA build")),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    return request.param

