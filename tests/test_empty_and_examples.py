"""Empty problems (batch 0, s_q 0) on every implementation, and the example scripts run
as a user runs them (a subprocess with the installed package, tiny sizes).

The empty problems check shapes and dtypes only (there is no value to compare); on a GPU
they reach the kernels' early return (ffi_handlers.cc). Verified: an unknown flag passed
to generate.py fails its test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import jax_etap

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("batch,s_q,h_q", [(0, 1, 16), (2, 0, 16), (0, 2, 128), (3, 0, 64)])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "dense"])
def test_empty_problem(implementation, batch, s_q, h_q, paged):
    q = jnp.zeros((batch, s_q, h_q, 576), jnp.bfloat16)
    seqlens = jnp.full((batch,), 5, jnp.int32)
    if paged:
        kv, table = jnp.ones((4, 64, 1, 576), jnp.bfloat16), jnp.zeros((batch, 2), jnp.int32)
    else:
        kv, table = jnp.ones((batch, 64, 1, 576), jnp.bfloat16), None
    out, lse = jax_etap.mla_decode(q, kv, seqlens, table, causal=True, implementation=implementation)
    assert out.shape == (batch, s_q, h_q, 512) and out.dtype == jnp.bfloat16
    assert lse.shape == (batch, h_q, s_q) and lse.dtype == jnp.float32


def _run_example(*args):
    # -P and cwd "/": the installed package, never the source tree's jax_etap/.
    proc = subprocess.run([sys.executable, "-P", *map(str, args)], cwd="/", capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout


def test_decode_demo_runs():
    out = _run_example(EXAMPLES / "decode_demo.py", "--batch", 2, "--seqlen", 130, "--heads", 16, "--s-q", 2)
    assert out.strip()


def test_generate_runs():
    pytest.importorskip("flax.nnx")
    out = _run_example(EXAMPLES / "generate.py", "--layers", 1, "--batch", 2, "--prompt-len", 6, "--new-tokens", 3,
                       "--repeats", 1, "--implementation", "xla")
    assert out.strip()
