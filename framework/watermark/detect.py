"""Detectors: one jitted batch scores every row of a [B, T] token array under a KGW, SynthID or Gumbel watermark.

Glossary: B batch, T time, W window length.

`detect(scheme, tokens_BT, lengths_B, start_B)` scores positions t with start_B <= t < lengths_B (the prompt before
start_B is context only, never scored) that have a full context, minus the scheme's masked positions:
  - KGW: repeated (context, token) n-grams when `ignore_repeated_ngrams`;
  - SynthID: contexts repeated within `context_history_size` (the reference's mask), and everything from the first
    `eos_id` on when given;
  - Gumbel: repeated (context, token) n-grams (always: a repeat is not a fresh uniform).
It returns a `Detection` (score, p-value, number of scored tokens, enough) per row; a row with fewer than
`min_tokens` scored tokens gets enough=False, score 0 and p-value 1, never a NaN.

`detect_windows(scheme, ..., window=W)` slides a window of W positions over each row and reports the span with the
smallest p-value, and that p-value times the number of windows (Bonferroni; conservative).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from framework.watermark import base
from framework.watermark.base import Detection
from framework.watermark.gumbel import Gumbel
from framework.watermark.kgw import KGW
from framework.watermark.synthid import SynthID, default_weights

Scheme = KGW | SynthID | Gumbel


class WindowDetection(NamedTuple):
    """Per-row best window: positions [start, end), its score, its p-value times the number of windows (capped at
    1), its raw p-value and its scored-token count; enough=False where no window had `min_tokens` scored tokens."""

    start: Int[Array, " B"]
    end: Int[Array, " B"]
    score: Float[Array, " B"]
    p_value: Float[Array, " B"]
    p_value_raw: Float[Array, " B"]
    num_scored: Int[Array, " B"]
    enough: Bool[Array, " B"]


def _weights(scheme, weighted, weights):
    if not isinstance(scheme, SynthID):
        if weighted or weights is not None:
            raise ValueError(f"detect: weighted/weights apply to SynthID only, not {type(scheme).__name__}")
        return None
    if weights is not None:
        w = np.asarray(weights, np.float32)
        if w.shape != (scheme.depth,):
            raise ValueError(
                f"detect: weights has shape {w.shape}; expected ({scheme.depth},), one per key of the watermark "
                f"(len(keys)={scheme.depth})"
            )
        return tuple(float(x) for x in w)
    return tuple(float(x) for x in default_weights(scheme.depth)) if weighted else None


def _context_width(scheme) -> int:
    return scheme.ngram_len - 1 if isinstance(scheme, SynthID) else scheme.context_width


@functools.partial(jax.jit, static_argnames=("scheme", "weights", "skip_repeats", "eos_id"))
def _token_mask(tokens_BT, lengths_B, start_B, *, scheme, weights, skip_repeats, eos_id):
    """(values [B, T] float32, scored [B, T] bool)."""
    B, T = tokens_BT.shape
    if isinstance(scheme, SynthID):
        val_BT, (hi, lo), full_BT = scheme.token_values(tokens_BT, weights)
    else:
        val_BT, (hi, lo), full_BT = scheme.token_values(tokens_BT)
    pos_BT = jnp.arange(T)[None, :]
    scored_BT = full_BT & (pos_BT >= start_B[:, None]) & (pos_BT < lengths_B[:, None])
    if isinstance(scheme, SynthID):
        # The reference's history runs over the whole text (prompt included); contexts need full n-grams.
        rep_BT = base.repeated_keys(hi, lo, full_BT & (pos_BT < lengths_B[:, None]), scheme.context_history_size)
        scored_BT = scored_BT & ~rep_BT
        if eos_id is not None:
            seen_eos_BT = jnp.cumsum(tokens_BT == eos_id, axis=1) > 0
            # An n-gram containing the EOS or anything after it is masked (as the reference's EOS mask).
            scored_BT = scored_BT & ~seen_eos_BT
    elif skip_repeats:
        scored_BT = scored_BT & ~base.repeated_keys(hi, lo, scored_BT, None)
    return jnp.where(scored_BT, val_BT, 0.0), scored_BT


def _score(scheme, sum_B, count_B, weights):
    if isinstance(scheme, SynthID):
        return scheme.score_and_pvalue(sum_B, count_B, weights)
    return scheme.score_and_pvalue(sum_B, count_B)


@functools.partial(jax.jit, static_argnames=("scheme", "weights", "skip_repeats", "eos_id", "min_tokens"))
def _detect_jit(tokens_BT, lengths_B, start_B, *, scheme, weights, skip_repeats, eos_id, min_tokens):
    val_BT, scored_BT = _token_mask(
        tokens_BT, lengths_B, start_B, scheme=scheme, weights=weights, skip_repeats=skip_repeats, eos_id=eos_id
    )
    count_B = jnp.sum(scored_BT, axis=1).astype(jnp.int32)
    score_B, p_B = _score(scheme, jnp.sum(val_BT, axis=1), count_B, weights)
    enough_B = count_B >= min_tokens
    return Detection(jnp.where(enough_B, score_B, 0.0), jnp.where(enough_B, p_B, 1.0), count_B, enough_B)


def _prepare(scheme, tokens_BT, lengths_B, start_B, min_tokens, where):
    if not isinstance(scheme, (KGW, SynthID, Gumbel)):
        raise ValueError(f"{where}: scheme must be a KGW, SynthID or Gumbel watermark, got {type(scheme).__name__}")
    base.check_int("min_tokens", min_tokens, 1, where=where)
    tokens, lengths, start = base.check_tokens(tokens_BT, lengths_B, start_B, scheme.vocab_size, where)
    width = _context_width(scheme)
    if tokens.shape[1] <= width:
        name = "ngram_len" if isinstance(scheme, SynthID) else "context_width"
        value = scheme.ngram_len if isinstance(scheme, SynthID) else scheme.context_width
        raise ValueError(
            f"{where}: {name}={value} needs texts longer than {width} tokens to score any, but the token array is "
            f"{tokens.shape[1]} wide"
        )
    return tokens, lengths, start


def detect(
    scheme: Scheme,
    tokens_BT,
    lengths_B=None,
    start_B=None,
    *,
    min_tokens: int = 1,
    ignore_repeated_ngrams: bool | None = None,
    weighted: bool = False,
    weights=None,
    eos_id: int | None = None,
) -> Detection:
    """Scores each row of `tokens_BT` [B, T] under `scheme`; returns a per-row `Detection`.

    Args:
      scheme: the watermark the text may carry (the same frozen dataclass that generated it).
      tokens_BT: int token ids, [B, T] (or [T]); lengths_B: valid tokens per row (default T); start_B: first scored
        position per row (default 0): put the prompt length here, the prompt is then only context.
      min_tokens: rows with fewer scored tokens get enough=False, score 0, p-value 1.
      ignore_repeated_ngrams: score each (context, token) n-gram once (KGW: default False; Gumbel: always True).
      weighted / weights: SynthID's weighted-mean score (default weights or one weight per key); p-value then
        approximate (normal), otherwise exact.
      eos_id: SynthID: n-grams from the first eos_id on are not scored.
    """
    tokens, lengths, start = _prepare(scheme, tokens_BT, lengths_B, start_B, min_tokens, "detect")
    w = _weights(scheme, weighted, weights)
    if isinstance(scheme, Gumbel) and ignore_repeated_ngrams is False:
        raise ValueError("detect: ignore_repeated_ngrams=False is not available for Gumbel (its p-value needs it)")
    skip = isinstance(scheme, Gumbel) or bool(ignore_repeated_ngrams)
    if eos_id is not None and not isinstance(scheme, SynthID):
        raise ValueError(f"detect: eos_id applies to SynthID only, not {type(scheme).__name__}")
    return _detect_jit(
        tokens, lengths, start, scheme=scheme, weights=w, skip_repeats=skip, eos_id=eos_id, min_tokens=min_tokens
    )


@functools.partial(jax.jit, static_argnames=("scheme", "weights", "skip_repeats", "window", "min_tokens"))
def _windows_jit(tokens_BT, lengths_B, start_B, *, scheme, weights, skip_repeats, window, min_tokens):
    val_BT, scored_BT = _token_mask(
        tokens_BT, lengths_B, start_B, scheme=scheme, weights=weights, skip_repeats=skip_repeats, eos_id=None
    )
    B, T = val_BT.shape
    csum = jnp.pad(jnp.cumsum(val_BT, axis=1), ((0, 0), (1, 0)))
    ccnt = jnp.pad(jnp.cumsum(scored_BT.astype(jnp.int32), axis=1), ((0, 0), (1, 0)))
    sum_BK = csum[:, window:] - csum[:, :-window]  # window k covers positions [k, k + window)
    cnt_BK = ccnt[:, window:] - ccnt[:, :-window]
    score_BK, p_BK = _score(scheme, sum_BK, cnt_BK, weights)
    ok_BK = cnt_BK >= min_tokens
    p_BK = jnp.where(ok_BK, p_BK, 1.0)
    best_B = jnp.argmin(p_BK, axis=1)
    take = lambda x: jnp.take_along_axis(x, best_B[:, None], axis=1)[:, 0]  # noqa: E731
    # Windows that could hold scored tokens: those overlapping [start, length).
    n_windows_B = jnp.maximum(lengths_B - start_B - window + 1, 1).astype(jnp.float32)
    p_raw, enough = take(p_BK), take(ok_BK)
    return WindowDetection(
        best_B.astype(jnp.int32),
        (best_B + window).astype(jnp.int32),
        jnp.where(enough, take(score_BK), 0.0),
        jnp.where(enough, jnp.minimum(p_raw * n_windows_B, 1.0), 1.0),
        jnp.where(enough, p_raw, 1.0),
        take(cnt_BK).astype(jnp.int32),
        enough,
    )


def detect_windows(
    scheme: Scheme,
    tokens_BT,
    lengths_B=None,
    start_B=None,
    *,
    window: int,
    min_tokens: int = 1,
    ignore_repeated_ngrams: bool | None = None,
    weighted: bool = False,
) -> WindowDetection:
    """Finds, per row, the `window`-position span most likely to be watermarked; see `WindowDetection`."""
    tokens, lengths, start = _prepare(scheme, tokens_BT, lengths_B, start_B, min_tokens, "detect_windows")
    window = base.check_int("window", window, 1, tokens.shape[1], where="detect_windows")
    w = _weights(scheme, weighted, None)
    skip = isinstance(scheme, Gumbel) or bool(ignore_repeated_ngrams)
    return _windows_jit(
        tokens, lengths, start, scheme=scheme, weights=w, skip_repeats=skip, window=window, min_tokens=min_tokens
    )


def token_scores(scheme: Scheme, tokens_BT, lengths_B=None, start_B=None, *, ignore_repeated_ngrams=None):
    """Per-token statistic and scored mask, ([B, T] float32, [B, T] bool): where a text's signal lies."""
    tokens, lengths, start = _prepare(scheme, tokens_BT, lengths_B, start_B, 1, "token_scores")
    skip = isinstance(scheme, Gumbel) or bool(ignore_repeated_ngrams)
    return _token_mask(tokens, lengths, start, scheme=scheme, weights=None, skip_repeats=skip, eos_id=None)


def join_generation(prompts, out, pad_id: int = 0):
    """Prompt + generated tokens of a `generate` call as (tokens [B, T], lengths [B], start [B]) for `detect`."""
    toks = np.asarray(out.tokens)
    lens = np.asarray(out.lengths)
    plens = [len(p) for p in prompts]
    width = max(plens) + toks.shape[1]
    tokens = np.full((len(plens), width), pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : plens[b]] = np.asarray(p)
        tokens[b, plens[b] : plens[b] + lens[b]] = toks[b, : lens[b]]
    return tokens, np.asarray(plens, np.int32) + lens.astype(np.int32), np.asarray(plens, np.int32)
