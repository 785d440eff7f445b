"""End to end: the toy DeepSeek-style decoder of examples/generate.py, prefilled and then
generating greedily in one jitted lax.scan.

Greedy tokens are compared through the plain (non-absorbed, float32) path: one prefill
over each prompt followed by the generated tokens gives the logits with which every
generated token should have been chosen. The absorbed decode path reads a float16 cache,
so its logits differ from those by rounding only; measured on CPU the largest gap between
a chosen token's logit and the maximum is 0 with a float16 cache (and 1.8e-3 with
bfloat16, at one near-tie), with logits of standard deviation ~1 and a median top-2
margin of ~0.2. TIE = 1e-2 therefore lets only near-ties flip: a wrong position, scale
or cache slot moves logits by far more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax.nnx")

import generate  # noqa: E402  (examples/, on pytest's pythonpath; it needs flax)

import jax_etap  # noqa: E402

TIE = 1e-2


@pytest.fixture(scope="module")
def model():
    return generate.create_model(generate.toy_config(num_hidden_layers=2), seed=1)


def prompts_for(model, rng, batch, max_len):
    return generate.random_prompts(rng, batch, model.lm_head.out_features, max_len)


def test_default_and_xla_loops_agree_with_the_plain_path(model, rng):
    """On CPU both implementations run the reference: identical tokens; and every token is
    the plain path's argmax up to TIE."""
    prompts, lengths = prompts_for(model, rng, 3, 12)
    assert len(set(lengths.tolist())) > 1
    tokens = generate.generate(model, prompts, lengths, 12, cache_dtype=jnp.float16)
    xla = generate.generate(model, prompts, lengths, 12, implementation="xla", cache_dtype=jnp.float16)
    np.testing.assert_array_equal(tokens, xla)
    assert all(len(set(row)) > 3 for row in tokens.tolist()), f"degenerate generation {tokens}"
    gaps = generate.logit_gaps(generate.teacher_forced_logits(model, prompts, lengths, tokens), tokens)
    assert gaps.max() <= TIE, f"a generated token's logit is {gaps.max():.2e} below the plain path's maximum"


@pytest.mark.gpu
@pytest.mark.skipif(not jax_etap.kernel_available(), reason="the CUDA kernel cannot run here")
def test_kernel_loop_gives_the_reference_loops_tokens(model, rng):
    """64 greedy steps through the kernel and through the reference: the same tokens, except
    that a sequence may part ways at a near-tie (where the two candidates' plain-path
    logits are within TIE); each loop's tokens are the plain path's argmax up to TIE."""
    prompts, lengths = prompts_for(model, rng, 4, 32)
    with jax.default_matmul_precision("highest"):  # no TF32 noise in the projections
        kernel = generate.generate(model, prompts, lengths, 64, cache_dtype=jnp.float16)
        reference = generate.generate(model, prompts, lengths, 64, implementation="xla", cache_dtype=jnp.float16)
        logits = generate.teacher_forced_logits(model, prompts, lengths, kernel)
        reference_logits = generate.teacher_forced_logits(model, prompts, lengths, reference)
    for name, tokens, plain in (("kernel", kernel, logits), ("reference", reference, reference_logits)):
        gaps = generate.logit_gaps(plain, tokens)
        assert gaps.max() <= TIE, f"{name} loop: a token's logit is {gaps.max():.2e} below the plain path's maximum"
    for b, step in enumerate(generate.first_difference(kernel, reference)):
        if step is not None:
            # The histories agree before `step`, so the kernel history's logits judge both.
            gap = abs(logits[b, step, kernel[b, step]] - logits[b, step, reference[b, step]])
            assert gap <= TIE, f"sequence {b} parts at step {step}, where the candidates' logits differ by {gap:.2e}"
