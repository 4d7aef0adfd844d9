"""Pure sampling functions on a batch of next-token logits: temperature, top-k, top-p (nucleus), greedy.

Glossary: B batch, V vocab.

Every function takes fp32-castable `logits_BV` and works the same eagerly and under `jax.jit`; `temperature`,
`top_k` and `top_p` may be Python numbers or traced scalars, so one compiled decode loop serves every value.
Truncation masks logits to -inf; the order is temperature, then top-k, then top-p on the top-k-renormalised
distribution (the Hugging Face order). Randomness: decode step i (0-based; step 0 is the token sampled from the
prefill logits) draws with `step_key(rng, i) = jax.random.fold_in(rng, i)` and one `jax.random.categorical` over
the whole [B, V] batch, so a sample depends only on (rng, step, batch shape, logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Scalar = float | int | jax.Array


def step_key(rng: jax.Array, step: int | jax.Array) -> jax.Array:
    """The PRNG key of decode step `step` (0 = the token from the prefill logits)."""
    return jax.random.fold_in(rng, step)


def is_greedy(temperature: Scalar) -> bool:
    """True when `temperature` is the Python/concrete number 0 (greedy decoding); traced values mean sampling."""
    return isinstance(temperature, (int, float)) and float(temperature) == 0.0


def _sorted_desc(x_BV: jax.Array) -> jax.Array:
    return jnp.flip(jnp.sort(x_BV, axis=-1), axis=-1)


def _kth_largest(sorted_desc_BV: jax.Array, k: Scalar) -> Float[Array, "B 1"]:
    k = jnp.clip(jnp.asarray(k, jnp.int32), 1, sorted_desc_BV.shape[-1])
    return jax.lax.dynamic_index_in_dim(sorted_desc_BV, k - 1, axis=-1, keepdims=True)


def _nucleus_threshold(sorted_desc_BV: jax.Array, p: Scalar) -> Float[Array, "B 1"]:
    """Smallest logit still inside the nucleus: the minimal prefix of the sorted tokens with probability >= p."""
    probs_BV = jax.nn.softmax(sorted_desc_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of strictly better tokens
    p = jnp.asarray(p, jnp.float32)
    # Token j is needed iff the tokens before it fall short of p; the top token always qualifies (0 < p). p == 1
    # keeps everything even where the rounded cumulative sum reaches 1 early.
    keep_BV = (mass_before_BV < p) | (p >= 1.0)
    n_keep_B1 = jnp.sum(keep_BV, axis=-1, keepdims=True)
    return jnp.take_along_axis(sorted_desc_BV, n_keep_B1 - 1, axis=-1)


def process_logits(
    logits_BV: Float[Array, "B V"],
    *,
    temperature: Scalar = 1.0,
    top_k: Scalar | None = None,
    top_p: Scalar | None = None,
) -> Float[Array, "B V"]:
    """fp32 logits divided by `temperature` (> 0), then truncated to the top-k and/or top-p set (others -inf).

    Ties with the k-th largest logit (or with the nucleus' smallest logit) are kept, so a truncated set can be
    larger than k only through exact ties.
    """
    x_BV = logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k is None and top_p is None:
        return x_BV
    neg_inf = jnp.float32(-jnp.inf)
    sorted_BV = _sorted_desc(x_BV)  # one sort shared by top-k and top-p
    if top_k is not None:
        kth_B1 = _kth_largest(sorted_BV, top_k)
        x_BV = jnp.where(x_BV >= kth_B1, x_BV, neg_inf)
        sorted_BV = jnp.where(sorted_BV >= kth_B1, sorted_BV, neg_inf)  # still sorted: a masked suffix
    if top_p is not None:
        x_BV = jnp.where(x_BV >= _nucleus_threshold(sorted_BV, top_p), x_BV, neg_inf)
    return x_BV


def top_k_logits(logits_BV: Float[Array, "B V"], k: Scalar) -> Float[Array, "B V"]:
    """Keeps the k largest logits of each row (plus exact ties with the k-th), -inf elsewhere."""
    return process_logits(logits_BV, top_k=k)


def top_p_logits(logits_BV: Float[Array, "B V"], p: Scalar) -> Float[Array, "B V"]:
    """Keeps each row's nucleus, the smallest most-likely set with probability >= p (always the top token)."""
    return process_logits(logits_BV, top_p=p)


def greedy(logits_BV: Float[Array, "B V"]) -> Int[Array, "B"]:
    """Argmax token of each row (int32); the lowest id wins exact ties."""
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def sample(
    logits_BV: Float[Array, "B V"],
    key: jax.Array | None,
    *,
    temperature: Scalar,
    top_k: Scalar | None = None,
    top_p: Scalar | None = None,
) -> Int[Array, "B"]:
    """Next tokens (int32 [B]): argmax when `temperature` is the number 0, else a categorical draw with `key`.

    Greedy ignores top_k/top_p (truncation never removes the argmax). The draw is one `jax.random.categorical`
    over the whole batch, so row b's sample depends on the batch shape: keep B fixed to reproduce samples.
    """
    if is_greedy(temperature):
        return greedy(logits_BV)
    if key is None:
        raise ValueError("sample: temperature > 0 needs a PRNG key")
    x_BV = process_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, x_BV, axis=-1).astype(jnp.int32)


def token_logprobs(logits_BV: Float[Array, "B V"], tokens_B: Int[Array, "B"]) -> Float[Array, "B"]:
    """log p(token) under the unmodified distribution: log_softmax of the raw fp32 logits (no temperature/top-k/p)."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BV, tokens_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
