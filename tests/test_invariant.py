"""Batch-invariant reductions (framework.models.invariant): right values, and each row's bits independent of the rest.

"Bitwise" tests compare with `assert_array_equal`: the point of these functions is that a row computed alone, inside
a larger batch, or with trailing padding gives exactly the same float32 result.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.models import invariant, lm

LENGTHS = (1, 2, 3, 7, 32, 33, 64, 100)


def _rows(n, rows=24, seed=0):
    return (np.random.default_rng(seed).normal(size=(rows, n)) * 3).astype(np.float32)


@pytest.mark.parametrize("n", LENGTHS)
def test_pairwise_sum_and_max_values(n):
    x = _rows(n)
    total = np.asarray(jax.jit(invariant.pairwise_sum)(x))
    assert total.shape == (24, 1)
    exact = x.astype(np.float64).sum(-1, keepdims=True)
    # Pairwise summation: error bounded by ~log2(n) roundings of the running magnitudes.
    bound = np.float32(np.finfo(np.float32).eps) * max(1, int(np.ceil(np.log2(n)))) * np.abs(x).sum(-1, keepdims=True)
    assert np.all(np.abs(total - exact) <= bound)
    np.testing.assert_array_equal(jax.jit(invariant.pairwise_max)(x), x.max(-1, keepdims=True))


def test_an_empty_axis_reduces_to_the_identity():
    x = np.zeros((3, 0), np.float32)
    np.testing.assert_array_equal(invariant.pairwise_sum(x), np.zeros((3, 1), np.float32))
    np.testing.assert_array_equal(invariant.pairwise_max(x), np.full((3, 1), -np.inf, np.float32))


@pytest.mark.parametrize("n", LENGTHS)
def test_a_row_gives_the_same_bits_alone_in_a_batch_or_padded(n):
    x = _rows(n, rows=40)
    for fn, pad in ((invariant.pairwise_sum, 0.0), (invariant.pairwise_max, -np.inf)):
        f = jax.jit(fn)
        batch = np.asarray(f(x))
        for i in (0, 17, 39):
            np.testing.assert_array_equal(f(x[i : i + 1]), batch[i : i + 1])
        # Trailing neutral entries (masked cache slots, padding) change nothing, whatever their number.
        for extra in (1, 5, 64):
            padded = np.concatenate([x[:3], np.full((3, extra), pad, np.float32)], axis=-1)
            np.testing.assert_array_equal(f(padded), batch[:3])


def test_softmax_matches_jax_and_is_invariant_to_batch_and_masked_tail():
    x = _rows(72, rows=64)
    f = jax.jit(invariant.softmax)
    p = np.asarray(f(x))
    np.testing.assert_allclose(p, jax.nn.softmax(x, axis=-1), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(f(x[5:6]), p[5:6])
    # A decode step's row over S cache slots: the real scores, then masked slots at the dtype's minimum.
    masked = np.concatenate([x[:4], np.full((4, 56), np.finfo(np.float32).min, np.float32)], axis=-1)
    pm = np.asarray(f(masked))
    np.testing.assert_array_equal(pm[:, :72], p[:4])
    assert np.all(pm[:, 72:] == 0)


def test_softmax_gradients_match_jax_nn_softmax():
    x = jnp.asarray(_rows(33, rows=4))
    w = jnp.asarray(_rows(33, rows=4, seed=1))

    def loss(fn):
        return lambda x: jnp.sum(jnp.sin(fn(x) * w))

    np.testing.assert_allclose(
        jax.grad(loss(invariant.softmax))(x),
        jax.grad(loss(lambda x: jax.nn.softmax(x, axis=-1)))(x),
        rtol=1e-5,
        atol=1e-7,
    )


def test_rmsnorm_of_a_token_is_the_same_alone_or_in_a_batch(tiny_cfg):
    """XLA:CPU's own mean over d_model differs in the last bit between 8 rows and 8 x T rows; the norm must not."""
    norm = lm.RMSNorm(tiny_cfg)
    x_BTD = jnp.asarray(np.random.default_rng(0).normal(size=(8, 40, tiny_cfg.d_model)) * 2, jnp.float32)
    variables = norm.init(jax.random.key(0), x_BTD)
    f = jax.jit(norm.apply)
    full = np.asarray(f(variables, x_BTD))
    for t in (0, 7, 39):
        np.testing.assert_array_equal(f(variables, x_BTD[:, t : t + 1]), full[:, t : t + 1])
    np.testing.assert_allclose(
        full, x_BTD * jax.lax.rsqrt(jnp.mean(x_BTD * x_BTD, -1, keepdims=True) + tiny_cfg.norm_eps), rtol=1e-6
    )
