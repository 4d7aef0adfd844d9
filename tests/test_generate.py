"""`generate` (KV cache, one jitted prefill + while_loop) against the cache-free `reference_generate` oracle.

Every parity test uses the same prompts (ragged lengths 3, 7, 12) and N, so the oracle compiles each prefix length
once per session and `generate` compiles once per sampling mode.
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.inference import generate, reference_generate
from framework.models import lm

generate_lib = importlib.import_module("framework.inference.generate")  # the attribute is the function

PROMPT_LENS = (3, 7, 12)
N = 6
LOGPROB_ATOL = 1e-5  # fp32: the cache and full-prefix passes may differ only by the backend's matmul rounding


@pytest.fixture(scope="module")
def model(tiny_cfg):
    # x3 sharpens the random model's logits so greedy never meets a near-tie between cache and no-cache paths.
    params = jax.tree.map(lambda x: 3.0 * x, lm.init(tiny_cfg, jax.random.key(0)))
    return tiny_cfg, params


def _prompts(cfg, lens=PROMPT_LENS, seed=0):
    rs = np.random.RandomState(seed)
    return [np.concatenate([[cfg.bos_id], rs.randint(3, cfg.vocab_size, size=n - 1)]).astype(np.int32) for n in lens]


def _assert_same(out, ref):
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=LOGPROB_ATOL, rtol=0)
    np.testing.assert_allclose(out.processed_logprobs, ref.processed_logprobs, atol=LOGPROB_ATOL, rtol=0)


def test_greedy_matches_reference_on_ragged_prompts(model):
    cfg, params = model
    out = generate(params, cfg, _prompts(cfg), max_new_tokens=N)
    ref = reference_generate(params, cfg, _prompts(cfg), max_new_tokens=N)
    assert out.tokens.shape == (3, N) and out.tokens.dtype == jnp.int32
    assert out.logprobs.shape == (3, N) and out.logprobs.dtype == jnp.float32
    assert out.lengths.shape == (3,) and out.lengths.dtype == jnp.int32
    _assert_same(out, ref)
    assert np.all(np.asarray(out.logprobs)[np.arange(N) < np.asarray(out.lengths)[:, None]] < 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=0.8), dict(temperature=0.8, top_k=3), dict(temperature=1.0, top_p=0.7)],
    ids=["temp", "top_k", "top_p"],
)
def test_sampled_matches_reference_with_same_rng(model, kwargs):
    cfg, params = model
    rng = jax.random.key(7)
    out = generate(params, cfg, _prompts(cfg), max_new_tokens=N, rng=rng, **kwargs)
    ref = reference_generate(params, cfg, _prompts(cfg), max_new_tokens=N, rng=rng, **kwargs)
    _assert_same(out, ref)
    # Deterministic given rng; another key gives another sample.
    _assert_same(generate(params, cfg, _prompts(cfg), max_new_tokens=N, rng=rng, **kwargs), out)
    other = generate(params, cfg, _prompts(cfg), max_new_tokens=N, rng=jax.random.key(8), **kwargs)
    assert not np.array_equal(other.tokens, out.tokens)


def test_logprobs_are_under_the_unmodified_distribution(model):
    cfg, params = model
    prompt = _prompts(cfg)[1]
    out = generate(
        params, cfg, [prompt], max_new_tokens=N, temperature=0.8, top_k=3, rng=jax.random.key(1), stop_tokens=()
    )
    seq = np.concatenate([prompt, np.asarray(out.tokens[0])])
    logits_TV = jax.jit(lm.apply, static_argnums=2)(params, jnp.asarray(seq[None]), cfg)[0]
    logp_TV = jax.nn.log_softmax(logits_TV, axis=-1)
    expected = logp_TV[len(prompt) - 1 + np.arange(N), np.asarray(out.tokens[0])]
    np.testing.assert_allclose(out.logprobs[0], expected, atol=LOGPROB_ATOL, rtol=0)


def test_unrolled_layers_match_scanned(model):
    cfg, params = model
    out = generate(params, dataclasses.replace(cfg, scan_layers=False), _prompts(cfg), max_new_tokens=N)
    _assert_same(out, generate(params, cfg, _prompts(cfg), max_new_tokens=N))


def test_bfloat16_runs(model):
    cfg, params = model
    out = generate(
        params,
        dataclasses.replace(cfg, dtype="bfloat16"),
        _prompts(cfg),
        max_new_tokens=N,
        temperature=0.8,
        top_p=0.9,
        rng=jax.random.key(0),
    )
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (3, N) and np.all((tokens >= 0) & (tokens < cfg.vocab_size))
    assert np.all(np.isfinite(out.logprobs)) and out.logprobs.dtype == jnp.float32
    assert np.all((np.asarray(out.lengths) >= 1) & (np.asarray(out.lengths) <= N))


def test_stop_tokens_stop_each_sequence_independently(model):
    cfg, params = model
    prompts = _prompts(cfg, seed=3)
    free = generate(params, cfg, prompts, max_new_tokens=N, stop_tokens=())
    free_tokens = np.asarray(free.tokens)
    np.testing.assert_array_equal(free.lengths, N)  # () never stops: all steps run
    # Stop on row 0's third token and row 1's first token; the prefix before a stop does not depend on the stop set.
    stop = {int(free_tokens[0, 2]), int(free_tokens[1, 0])}
    out = generate(params, cfg, prompts, max_new_tokens=N, stop_tokens=tuple(stop))
    expected_len = []
    for row in free_tokens:
        hits = np.flatnonzero(np.isin(row, list(stop)))
        expected_len.append(hits[0] + 1 if hits.size else N)
    np.testing.assert_array_equal(out.lengths, expected_len)
    assert min(expected_len) < max(expected_len), "want sequences stopping at different steps"
    for b, n in enumerate(expected_len):
        np.testing.assert_array_equal(out.tokens[b, :n], free_tokens[b, :n])
        np.testing.assert_allclose(out.logprobs[b, :n], free.logprobs[b, :n], atol=LOGPROB_ATOL, rtol=0)
        np.testing.assert_array_equal(out.tokens[b, n:], cfg.pad_id)
        np.testing.assert_array_equal(out.logprobs[b, n:], 0.0)
    _assert_same(out, reference_generate(params, cfg, prompts, max_new_tokens=N, stop_tokens=tuple(stop)))


def test_equal_length_2d_prompts_and_dict_config(model):
    cfg, params = model
    prompts_BT = np.stack(_prompts(cfg, lens=(7, 7)))
    out = generate(params, cfg.to_dict(), prompts_BT, max_new_tokens=N)
    _assert_same(out, generate(params, cfg, list(prompts_BT), max_new_tokens=N))


def test_prompt_lengths_in_one_bucket_share_a_compile(model):
    cfg, params = model
    generate(params, cfg, _prompts(cfg, lens=(2, 9, 12)), max_new_tokens=N)
    size = generate_lib._generate_jit._cache_size()
    generate(params, cfg, _prompts(cfg, lens=(5, 16, 1), seed=1), max_new_tokens=N)
    generate(params, cfg, _prompts(cfg, lens=(4, 4, 4), seed=2), max_new_tokens=N, stop_tokens=(5, 6))
    assert generate_lib._generate_jit._cache_size() == size
    assert generate_lib.bucket_length(17, 128) == 32 and generate_lib.bucket_length(100, 64) == 64


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ("oov", {}, r"generate prompt 1: token id 99 at position \(2,\)"),
        ("negative", {}, r"generate prompt 0: token id -1 at position \(0,\)"),
        ("empty", {}, r"generate prompt 1 is empty"),
        (
            "too_long",
            {},
            r"generate prompt 2: prompt length 12 \+ max_new_tokens 120 = 132 exceeds model.max_seq_len=128",
        ),
        ("ok", {"temperature": 0.5}, r"needs rng"),
        ("ok", {"temperature": -1.0}, r"temperature must be finite and >= 0"),
        ("ok", {"top_k": 0}, r"top_k must be None or an int >= 1"),
        ("ok", {"top_p": 0.0}, r"top_p must be None or in \(0, 1\]"),
        ("ok", {"top_p": 1.5}, r"top_p must be None or in \(0, 1\]"),
        ("ok", {"max_new_tokens": 0}, r"max_new_tokens must be an int >= 1"),
        ("ok", {"stop_tokens": (24,)}, r"generate stop_tokens: token id 24"),
        ("2d_in_list", {}, r"generate prompt 0: expected a 1-D token array"),
        ("none", {}, r"prompts must be a non-empty list"),
    ],
)
def test_boundary_errors(model, prompts, kwargs, match):
    cfg, params = model
    ok = _prompts(cfg)
    prompts = {
        "ok": ok,
        "oov": [ok[0], np.array([1, 5, 99, 4]), ok[2]],
        "negative": [np.array([-1, 3])],
        "empty": [ok[0], np.array([], np.int32)],
        "too_long": ok,
        "2d_in_list": [np.ones((2, 3), np.int32)],
        "none": [],
    }[prompts]
    kwargs = {"max_new_tokens": 120 if match.startswith("generate prompt 2") else N, **kwargs}
    for fn in (generate, reference_generate):
        with pytest.raises(ValueError, match=match):
            fn(params, cfg, prompts, **kwargs)
