"""The KV-cache decode is exact, not merely close: in float64 it equals the cache-free reference to rounding.

In fp32 the two paths may differ by the backend's rounding (the model's reductions are batch-invariant,
`framework/models/invariant.py`, but matmuls are not; `tests/test_generate.py` bounds the gap at 1e-5). Rerunning
both in float64 with the diagnostic's patch (`scripts/bench/decode_parity_fp64.py`) separates rounding from a real
cache error: what remains must be ~1e-14.
"""

import dataclasses

import jax
import numpy as np
import pytest

from framework.inference import generate, reference_generate
from framework.models import lm
from scripts.bench import decode_parity_fp64 as fp64


@pytest.fixture
def float64_mode(monkeypatch):
    """x64 on and the model's fp32 casts re-pointed at float64 for this test only."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    fp64.use_float64(setattr=monkeypatch.setattr, setitem=monkeypatch.setitem)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("kwargs", [{}, dict(temperature=1.0, top_k=5)], ids=["greedy", "sampled"])
def test_cached_decode_equals_reference_in_float64(tiny_cfg, float64_mode, kwargs):
    cfg = dataclasses.replace(tiny_cfg, dtype="float64", param_dtype="float64")
    params = jax.tree.map(lambda x: np.asarray(3.0 * x, np.float64), lm.init(tiny_cfg, jax.random.key(0)))
    rs = np.random.RandomState(0)
    prompts = [
        np.concatenate([[cfg.bos_id], rs.randint(3, cfg.vocab_size, size=n - 1)]).astype(np.int32) for n in (3, 7, 12)
    ]
    if kwargs:
        kwargs = dict(kwargs, rng=jax.random.key(1))
    out = generate(params, cfg, prompts, max_new_tokens=6, **kwargs)
    ref = reference_generate(params, cfg, prompts, max_new_tokens=6, **kwargs)
    assert np.asarray(out.logprobs).dtype == np.float64 and np.asarray(ref.logprobs).dtype == np.float64
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-12, rtol=0)
