"""Sampling functions: greedy, temperature, top-k, top-p (minimal nucleus), per-row draws and keys, the order of
temperature, processors and truncation, and draw frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.inference import sampling


def _random_logits(seed: int, shape=(6, 40)) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).normal(size=shape) * 2.0, jnp.float32)


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
    logits_BV = _random_logits(0)
    expected_B = np.argmax(np.asarray(logits_BV), axis=-1)
    np.testing.assert_array_equal(sampling.greedy(logits_BV), expected_B)
    # temperature 0 never touches the key and ignores truncation settings.
    np.testing.assert_array_equal(sampling.sample(logits_BV, None, temperature=0.0, top_k=3, top_p=0.5), expected_B)
    assert sampling.sample(logits_BV, None, temperature=0).dtype == jnp.int32


def test_sample_without_key_raises():
    with pytest.raises(ValueError, match="PRNG key"):
        sampling.sample(_random_logits(0), None, temperature=0.7)


def test_temperature_scales_logits():
    logits_BV = _random_logits(1)
    np.testing.assert_allclose(
        sampling.process_logits(logits_BV, temperature=2.0), np.asarray(logits_BV) / 2.0, rtol=1e-6
    )


@pytest.mark.parametrize("k", [1, 5, 40, 100])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits_BV = _random_logits(2)  # continuous values: no ties
    kept_BV = np.isfinite(np.asarray(sampling.top_k_logits(logits_BV, k)))
    k_eff = min(k, logits_BV.shape[-1])
    np.testing.assert_array_equal(kept_BV.sum(-1), k_eff)
    top_BK = np.argsort(-np.asarray(logits_BV), axis=-1)[:, :k_eff]
    assert np.all(np.take_along_axis(kept_BV, top_BK, axis=-1))
    # kept entries are unchanged
    np.testing.assert_array_equal(
        np.asarray(sampling.top_k_logits(logits_BV, k))[kept_BV], np.asarray(logits_BV)[kept_BV]
    )


def _minimal_nucleus(logits_V: np.ndarray, p: float) -> set[int]:
    probs = np.exp(logits_V - logits_V.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    m = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest m with cumsum[m-1] >= p
    return set(order[: min(m, len(order))].tolist())


@pytest.mark.parametrize("p", [1e-4, 0.3, 0.75, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_minimal_nucleus(p):
    logits_BV = _random_logits(3)
    kept_BV = np.isfinite(np.asarray(sampling.top_p_logits(logits_BV, p)))
    for b in range(logits_BV.shape[0]):
        assert set(np.flatnonzero(kept_BV[b]).tolist()) == _minimal_nucleus(np.asarray(logits_BV[b], np.float64), p)
    assert np.all(kept_BV.sum(-1) >= 1)


def test_top_p_on_a_known_distribution():
    probs_V = np.array([0.05, 0.5, 0.15, 0.3])
    logits_1V = jnp.asarray(np.log(probs_V)[None], jnp.float32)
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(sampling.top_p_logits(logits_1V, p))[0])).tolist())
    assert kept(0.4) == {1}
    assert kept(0.75) == {1, 3}
    assert kept(0.85) == {1, 2, 3}
    assert kept(0.99) == {0, 1, 2, 3}


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits_1V = jnp.asarray(np.log([[0.4, 0.3, 0.2, 0.1]]), jnp.float32)
    # Alone, p = 0.5 needs {0.4, 0.3}; after top-2 the top token has 4/7 >= 0.5 by itself.
    assert np.isfinite(np.asarray(sampling.top_p_logits(logits_1V, 0.5))).sum() == 2
    both = np.asarray(sampling.process_logits(logits_1V, top_k=2, top_p=0.5))
    np.testing.assert_array_equal(np.isfinite(both[0]), [True, False, False, False])


def test_traced_settings_match_python_settings():
    logits_BV = _random_logits(4)
    fn = jax.jit(lambda x, t, k, p: sampling.process_logits(x, temperature=t, top_k=k, top_p=p))
    traced = fn(logits_BV, jnp.float32(0.7), jnp.int32(7), jnp.float32(0.8))
    eager = sampling.process_logits(logits_BV, temperature=0.7, top_k=7, top_p=0.8)
    np.testing.assert_array_equal(np.isfinite(traced), np.isfinite(eager))
    np.testing.assert_allclose(
        np.where(np.isfinite(eager), traced, 0), np.where(np.isfinite(eager), eager, 0), rtol=1e-6
    )


def test_step_keys_are_deterministic_and_distinct():
    logits_BV = jnp.zeros((64, 24), jnp.float32)
    rng = jax.random.key(0)
    draw = lambda i: np.asarray(sampling.sample(logits_BV, sampling.step_key(rng, i), temperature=1.0))
    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(0), draw(1))


def test_token_logprobs_is_log_softmax_of_raw_logits():
    logits_BV = _random_logits(5)
    tokens_B = jnp.arange(logits_BV.shape[0], dtype=jnp.int32)
    expected = jax.nn.log_softmax(logits_BV, axis=-1)[jnp.arange(logits_BV.shape[0]), tokens_B]
    np.testing.assert_allclose(sampling.token_logprobs(logits_BV, tokens_B), expected, rtol=1e-6)


# Pearson chi-square with n = 40000 draws of a fixed seed. Under the null the statistic is chi2(df) distributed;
# the threshold is its 0.999 quantile (df = 5: 20.52; df = 2: 13.82), so a correct sampler fails with p < 1e-3
# for a random seed and never for this fixed one, while a wrong temperature or truncation gives statistics in the
# hundreds or more.
_N_DRAWS = 40_000
_CHI2_999 = {2: 13.82, 5: 20.52}


def _chi_square(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=probs.size)
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token outside the support"
    expected = probs[support] * tokens.size
    return float(((counts[support] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature, top_k, df", [(1.0, None, 5), (2.0, None, 5), (0.5, 3, 2)])
def test_sample_frequencies_match_softmax(temperature, top_k, df):
    logits_V = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (_N_DRAWS, logits_V.size))
    tokens = np.asarray(sampling.sample(logits_BV, jax.random.key(123), temperature=temperature, top_k=top_k))
    scaled = logits_V / temperature
    if top_k is not None:
        scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    assert _chi_square(tokens, probs) < _CHI2_999[df]
    # The test has power: the same draws are far from the untempered, untruncated softmax.
    untouched = np.exp(logits_V - logits_V.max()) / np.exp(logits_V - logits_V.max()).sum()
    if temperature != 1.0:
        assert _chi_square(tokens, untouched) > 100


def test_categorical_rows_draws_each_row_with_its_own_key():
    logits_BV = _random_logits(6)
    keys_B = jax.random.split(jax.random.key(3), logits_BV.shape[0])
    drawn_B = np.asarray(sampling.categorical_rows(keys_B, logits_BV))
    alone_B = [int(jax.random.categorical(keys_B[b], logits_BV[b])) for b in range(logits_BV.shape[0])]
    np.testing.assert_array_equal(drawn_B, alone_B)
    # A row's draw ignores its neighbours: the same key and logits in another batch draw the same token.
    np.testing.assert_array_equal(sampling.categorical_rows(keys_B[2:4], logits_BV[2:4]), drawn_B[2:4])


def test_row_keys_fold_one_key_per_row_and_pass_a_batch_through():
    rng = jax.random.key(9)
    keys_B = sampling.row_keys(rng, 4)
    expected = np.stack([jax.random.key_data(jax.random.fold_in(rng, b)) for b in range(4)])
    np.testing.assert_array_equal(jax.random.key_data(keys_B), expected)
    np.testing.assert_array_equal(jax.random.key_data(sampling.row_keys(keys_B, 4)), expected)
    with pytest.raises(ValueError, match=r"expected one key or 3 keys"):
        sampling.row_keys(keys_B, 3)
    step = jax.random.key_data(sampling.step_keys(keys_B, 5))
    np.testing.assert_array_equal(step[1], jax.random.key_data(jax.random.fold_in(keys_B[1], 5)))


def test_choose_tokens_applies_temperature_then_processors_then_truncation():
    logits_BV = _random_logits(7)
    seen = []

    def undo_temperature(x_BV, tokens_BS, lengths_B):
        seen.append(x_BV)
        return x_BV * 2.0

    keys_B = jax.random.split(jax.random.key(0), logits_BV.shape[0])
    tok_B, x_BV = sampling.choose_tokens(
        logits_BV, None, None, keys_B, greedy=False, temperature=2.0, top_k=1, processors=(undo_temperature,)
    )
    np.testing.assert_allclose(seen[0], np.asarray(logits_BV) / 2.0, rtol=1e-6)  # the processor saw logits / T
    np.testing.assert_allclose(x_BV, sampling.top_k_logits(logits_BV, 1), rtol=1e-6)  # top-k came after it
    np.testing.assert_array_equal(tok_B, sampling.greedy(logits_BV))  # top-1 leaves only the argmax to draw
    # Greedy: processors on the unscaled logits, argmax of the result.
    ban_top = lambda x_BV, t, n: x_BV.at[jnp.arange(x_BV.shape[0]), jnp.argmax(x_BV, -1)].set(-jnp.inf)
    tok_B, _ = sampling.choose_tokens(logits_BV, None, None, None, greedy=True, processors=(ban_top,))
    second_B = np.argsort(-np.asarray(logits_BV), axis=-1)[:, 1]
    np.testing.assert_array_equal(tok_B, second_B)


def test_categorical_rows_frequencies_match_softmax():
    logits_V = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (_N_DRAWS, logits_V.size))
    keys_B = sampling.row_keys(jax.random.key(321), _N_DRAWS)
    tokens = np.asarray(sampling.categorical_rows(keys_B, logits_BV))
    probs = np.exp(logits_V - logits_V.max())
    assert _chi_square(tokens, probs / probs.sum()) < _CHI2_999[5]
