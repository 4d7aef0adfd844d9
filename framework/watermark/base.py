"""Pieces every watermark shares: argument checks, each row's context at decode time, repeated-context masks and
the exact tail probabilities the detectors report.

Glossary: B batch, T time (a detector's token array), S token-buffer slots (`generate`'s [B, T + N] buffer),
V vocab, H context width, W history window.

At decode step with `lengths_B` valid tokens, a row's context is its last H tokens, `tokens_BS[b, L-H : L]`; a row
with fewer than H tokens has no full context and is left unwatermarked (the detectors then never score that
position either). In a detector, the token at position t has context `tokens[t-H : t]`.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


class Detection(NamedTuple):
    """Per-row result of a detector (arrays of shape [B]).

    score:      the scheme's statistic (KGW: z-score; SynthID: mean or weighted-mean g-value; Gumbel: mean of
                -log(1 - u)); 0.0 where `enough` is False.
    p_value:    one-sided p-value of "not watermarked"; 1.0 where `enough` is False (never NaN).
    num_scored: tokens that entered the statistic (prompt, context-less, masked and skipped repeats excluded).
    enough:     num_scored >= the detector's `min_tokens`; False is the explicit "not enough tokens" result.
    """

    score: Float[Array, " B"]
    p_value: Float[Array, " B"]
    num_scored: Int[Array, " B"]
    enough: Bool[Array, " B"]


def check_int(name: str, value, lo: int, hi: int | None = None, where: str = "watermark") -> int:
    """`value` as an int in [lo, hi] (hi None: unbounded), else ValueError naming `name`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < lo
        or (hi is not None and value > hi)
    ):
        span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{where}: {name}={value!r}: expected an int {span}")
    return int(value)


def check_vocab(name: str, vocab_size: int, logits_BV) -> None:
    """ValueError when the logits' vocabulary differs from the watermark's `vocab_size` (raised while tracing)."""
    if logits_BV.shape[-1] != vocab_size:
        raise ValueError(
            f"{name}: vocab_size={vocab_size} but the model's logits have {logits_BV.shape[-1]} entries; build the "
            "watermark with the model's cfg.vocab_size (generator and detector must agree)"
        )


def decode_context(tokens_BS: Int[Array, "B S"], lengths_B: Int[Array, " B"], width: int):
    """Each row's last `width` valid tokens [B, H] and whether the row has that many ([B] bool)."""
    idx_BH = lengths_B[:, None] - width + jnp.arange(width)[None, :]
    ctx_BH = jnp.take_along_axis(tokens_BS, jnp.clip(idx_BH, 0, tokens_BS.shape[1] - 1), axis=1)
    return ctx_BH, lengths_B >= width


def repeated_decode_context(tokens_BS, lengths_B, width: int, history: int) -> Bool[Array, " B"]:
    """Whether each row's current context (its last `width` tokens) equals one of the contexts of its previous
    `history` positions (the windows ending 1..history tokens earlier that lie wholly in the row).

    Every window start j of the buffer is compared at once through static slices (no gather), then kept where it
    lies 1..history positions back: O(S x width) per row whatever `history` is.
    """
    S = tokens_BS.shape[1]
    J = S - width  # window starts 0..S-width-1: a window ending at the last slot is never an earlier one
    if history <= 0 or J <= 0:
        return jnp.zeros(lengths_B.shape, bool)
    ctx_BH, _ = decode_context(tokens_BS, lengths_B, width)
    same_BJ = tokens_BS[:, :J] == ctx_BH[:, :1]
    for i in range(1, width):
        same_BJ = same_BJ & (tokens_BS[:, i : i + J] == ctx_BH[:, i : i + 1])
    back_BJ = lengths_B[:, None] - width - jnp.arange(J)[None, :]  # how far back the window at j ends
    return jnp.any(same_BJ & (back_BJ >= 1) & (back_BJ <= history), axis=1)


def repeated_keys(hi_BT, lo_BT, valid_BT, window: int | None) -> Bool[Array, "B T"]:
    """True where position t's 64-bit key (hi, lo) equals that of an earlier valid position at most `window`
    positions before it (None: anywhere before); invalid positions are never repeats and never matched.

    One sort per row: sorted by (valid, hi, lo, position), each position's predecessor with the same key is its
    most recent earlier occurrence.
    """
    B, T = hi_BT.shape
    pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))

    def one(hi, lo, valid, pos):
        order = jnp.lexsort((pos, lo, hi, valid))
        h, l, v, p = hi[order], lo[order], valid[order], pos[order]
        same = (h[1:] == h[:-1]) & (l[1:] == l[:-1]) & v[1:] & v[:-1]
        if window is not None:
            same = same & (p[1:] - p[:-1] <= window)
        rep_sorted = jnp.concatenate([jnp.zeros((1,), bool), same])
        return jnp.zeros((T,), bool).at[order].set(rep_sorted)

    return jax.vmap(one)(hi_BT, lo_BT, valid_BT, pos_BT)


def binomial_sf(k, n, p) -> jax.Array:
    """P(X >= k) for X ~ Binomial(n, p), exact (the regularised incomplete beta I_p(k, n - k + 1)); 1 where k <= 0."""
    k = jnp.asarray(k, jnp.float32)
    n = jnp.asarray(n, jnp.float32)
    a = jnp.maximum(k, 1.0)
    b = jnp.maximum(n - k + 1.0, 1.0)
    tail = jsp.betainc(a, b, jnp.asarray(p, jnp.float32))
    return jnp.where(k <= 0, 1.0, jnp.where(k > n, 0.0, tail))


def gamma_sf(s, n) -> jax.Array:
    """P(X >= s) for X ~ Gamma(n, 1), the sum of n independent Exp(1) (exact); 1 where n == 0."""
    n = jnp.asarray(n, jnp.float32)
    return jnp.where(n > 0, jsp.gammaincc(jnp.maximum(n, 1.0), jnp.maximum(jnp.asarray(s, jnp.float32), 0.0)), 1.0)


def normal_sf(z) -> jax.Array:
    """P(Z >= z) for a standard normal."""
    return jsp.ndtr(-jnp.asarray(z, jnp.float32))


def check_tokens(tokens_BT, lengths_B, start_B, vocab_size: int, where: str):
    """Host-side checks of a detector's inputs; returns (tokens int32 [B, T], lengths int32 [B], start int32 [B]).

    `lengths_B` defaults to T (every token valid), `start_B` (first scored position; the prompt lies before it and
    serves only as context) to 0.
    """
    tokens = np.asarray(tokens_BT)
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    if tokens.ndim != 2 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
        raise ValueError(f"{where}: tokens must be a [B, T] integer array, got {tokens.dtype} of shape {tokens.shape}")
    B, T = tokens.shape
    lengths = np.full((B,), T, np.int64) if lengths_B is None else np.asarray(lengths_B).reshape(-1)
    start = np.zeros((B,), np.int64) if start_B is None else np.asarray(start_B).reshape(-1)
    for name, arr in (("lengths", lengths), ("start", start)):
        if arr.shape != (B,) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{where}: {name} must be {B} ints (one per row), got {arr.dtype} of shape {arr.shape}")
    if np.any(lengths < 0) or np.any(lengths > T):
        raise ValueError(f"{where}: lengths must lie in [0, T={T}], got {lengths.tolist()[:8]}")
    if np.any(start < 0) or np.any(start > lengths):
        raise ValueError(
            f"{where}: start (the first scored position) must lie in [0, lengths], got {start.tolist()[:8]}"
        )
    valid = np.arange(T)[None, :] < lengths[:, None]
    if tokens.size and (np.any(tokens[valid] < 0) or np.any(tokens[valid] >= vocab_size)):
        bad = tokens[valid][(tokens[valid] < 0) | (tokens[valid] >= vocab_size)]
        raise ValueError(
            f"{where}: token id {int(bad[0])} outside [0, vocab_size={vocab_size}): the detector's vocab_size must "
            "match the generator's"
        )
    tokens = np.where(valid, tokens, 0).astype(np.int32)
    return tokens, lengths.astype(np.int32), start.astype(np.int32)
