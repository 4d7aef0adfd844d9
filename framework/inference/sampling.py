"""Pure sampling functions on a batch of next-token logits: temperature, logits processors, top-k, top-p, the draw.

Glossary: B batch, V vocab, S token-buffer slots (each row's prompt, then its generated tokens).

Every function takes fp32-castable `logits_BV` and works the same eagerly and under `jax.jit`; `temperature`,
`top_k` and `top_p` may be Python numbers or traced scalars, so one compiled decode loop serves every value.
Truncation masks logits to -inf. `choose_tokens` is the one decision step `generate` and `reference_generate` share:
temperature, then the logits processors in order, then top-k, then top-p on the top-k-renormalised distribution
(the Hugging Face order), then the draw (argmax, a per-row categorical, or a caller's sampler).

Randomness is per row. `row_keys(rng, B)` gives row b the key `fold_in(rng, b)` when `rng` is one key, or takes a
batch of B keys as they are; decode step i (0-based; step 0 is the token from the prefill logits) draws row b with
`fold_in(row_key_b, i)` (`step_keys`) and one categorical per row (`categorical_rows`), so a row's sample depends
only on its key, the step and its own logits: never on the batch size or on the other rows. `sample` is the plain
one-key draw over a whole [B, V] batch (its rows then depend on the batch shape).

Logits processors are `fn(logits_BV, tokens_BS, lengths_B) -> logits_BV`: `tokens_BS` holds each row's prompt then
its generated tokens, valid up to `lengths_B` (pad after). A sampler is `fn(logits_BV, tokens_BS, lengths_B, keys_B)
-> tokens_B` and replaces the draw. Both are static under jit, so they must be hashable (module functions, frozen
dataclasses, `functools.partial` objects kept and reused): each distinct one compiles the decode loop once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Scalar = float | int | jax.Array
LogitsProcessor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
Sampler = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def step_key(rng: jax.Array, step: int | jax.Array) -> jax.Array:
    """The PRNG key of decode step `step` (0 = the token from the prefill logits) for one key's stream."""
    return jax.random.fold_in(rng, step)


def _typed(rng: jax.Array) -> jax.Array:
    """A typed key array: raw uint32 key data ([2] or [B, 2] for threefry) is wrapped, typed keys pass through."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
    """One key per row, [batch]: `fold_in(rng, b)` for a single key, or a batch of `batch` keys unchanged."""
    rng = _typed(rng)
    if rng.ndim == 0:
        return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch, dtype=jnp.uint32))
    if rng.shape != (batch,):
        raise ValueError(f"row_keys: expected one key or {batch} keys, got a key array of shape {rng.shape}")
    return rng


def step_keys(keys_B: jax.Array, step: int | jax.Array) -> jax.Array:
    """Each row's key for decode step `step`: `fold_in(keys_B[b], step)`."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)


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


def truncate_logits(
    x_BV: Float[Array, "B V"], *, top_k: Scalar | None = None, top_p: Scalar | None = None
) -> Float[Array, "B V"]:
    """`x_BV` with everything outside the top-k and/or top-p set set to -inf (top-p on the top-k-renormalised set).

    Ties with the k-th largest logit (or with the nucleus' smallest logit) are kept, so a truncated set can be
    larger than k only through exact ties.
    """
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


def process_logits(
    logits_BV: Float[Array, "B V"],
    *,
    temperature: Scalar = 1.0,
    top_k: Scalar | None = None,
    top_p: Scalar | None = None,
) -> Float[Array, "B V"]:
    """fp32 logits divided by `temperature` (> 0), then truncated to the top-k and/or top-p set (others -inf)."""
    x_BV = logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    return truncate_logits(x_BV, top_k=top_k, top_p=top_p)


def top_k_logits(logits_BV: Float[Array, "B V"], k: Scalar) -> Float[Array, "B V"]:
    """Keeps the k largest logits of each row (plus exact ties with the k-th), -inf elsewhere."""
    return process_logits(logits_BV, top_k=k)


def top_p_logits(logits_BV: Float[Array, "B V"], p: Scalar) -> Float[Array, "B V"]:
    """Keeps each row's nucleus, the smallest most-likely set with probability >= p (always the top token)."""
    return process_logits(logits_BV, top_p=p)


def greedy(logits_BV: Float[Array, "B V"]) -> Int[Array, " B"]:
    """Argmax token of each row (int32); the lowest id wins exact ties."""
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def categorical_rows(keys_B: jax.Array, logits_BV: Float[Array, "B V"]) -> Int[Array, " B"]:
    """One categorical draw per row, row b with its own key `keys_B[b]` (int32 [B]); rows never share noise."""
    return jax.vmap(lambda key, x_V: jax.random.categorical(key, x_V))(keys_B, logits_BV).astype(jnp.int32)


def sample(
    logits_BV: Float[Array, "B V"],
    key: jax.Array | None,
    *,
    temperature: Scalar,
    top_k: Scalar | None = None,
    top_p: Scalar | None = None,
) -> Int[Array, " B"]:
    """Next tokens (int32 [B]): argmax when `temperature` is the number 0, else a categorical draw with one `key`.

    Greedy ignores top_k/top_p (truncation never removes the argmax). The draw is one `jax.random.categorical`
    over the whole batch, so row b's sample depends on the batch shape; `choose_tokens` draws per row instead.
    """
    if is_greedy(temperature):
        return greedy(logits_BV)
    if key is None:
        raise ValueError("sample: temperature > 0 needs a PRNG key")
    x_BV = process_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, x_BV, axis=-1).astype(jnp.int32)


def choose_tokens(
    logits_BV: Float[Array, "B V"],
    tokens_BS: Int[Array, "B S"] | None,
    lengths_B: Int[Array, " B"] | None,
    keys_B: jax.Array | None,
    *,
    greedy: bool,
    temperature: Scalar = 1.0,
    top_k: Scalar | None = None,
    top_p: Scalar | None = None,
    processors: Sequence[LogitsProcessor] = (),
    sampler: Sampler | None = None,
) -> tuple[Int[Array, " B"], Float[Array, "B V"]]:
    """One decode step's tokens (int32 [B]) and the fp32 logits they were drawn from, [B, V].

    Sampling (`greedy=False`): logits / temperature, then each processor in order, then top-k and top-p; the draw is
    `sampler(logits, tokens_BS, lengths_B, keys_B)` if given, else one categorical per row with `keys_B` (this
    step's per-row keys, `step_keys`). Greedy: the processors on the unscaled fp32 logits, no truncation (it never
    moves the argmax), and the argmax, or the sampler if one is given. The returned logits are what the draw saw:
    their log_softmax is the processed distribution. `tokens_BS`/`lengths_B` are only read by processors and
    samplers (None without them).
    """
    x_BV = logits_BV.astype(jnp.float32)
    if not greedy:
        x_BV = x_BV / jnp.asarray(temperature, jnp.float32)
    for fn in processors:
        x_BV = fn(x_BV, tokens_BS, lengths_B)
    if not greedy:
        x_BV = truncate_logits(x_BV, top_k=top_k, top_p=top_p)
    if sampler is not None:
        tok_B = sampler(x_BV, tokens_BS, lengths_B, keys_B)
    elif greedy:
        tok_B = jnp.argmax(x_BV, axis=-1)
    else:
        tok_B = categorical_rows(keys_B, x_BV)
    return jnp.asarray(tok_B).astype(jnp.int32), x_BV


def token_logprobs(logits_BV: Float[Array, "B V"], tokens_B: Int[Array, " B"]) -> Float[Array, " B"]:
    """log p(token) under the distribution `logits_BV` (fp32 log_softmax); the raw logits give the model's own."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BV, tokens_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
