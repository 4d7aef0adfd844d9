"""A trained Bayesian detector for SynthID (the model of Dathathri et al. 2024, in Flax), calibrated on held-out
unwatermarked text.

Glossary: B batch, T time, M depth (SynthID keys), R rows (training or calibration), N scored-token counts.

Model. Under "not watermarked" every g-value is Bernoulli(f), f the table's fraction of ones. Under "watermarked",
layer l's g-value is the winner's of a 2-leaf match: if the match saw two distinct tokens (probability ψ_l) the
winner has g = 1 unless both had g = 0, so P(g_l = 1 | w) = f + ψ_l f (1 - f) (= 1/2 + ψ_l / 4 at f = 1/2, the
reference's form). ψ_l depends on how peaked the distribution still is at layer l, which the earlier layers' g-values
reveal: ψ_l = sigmoid(β_l + Σ_{j<l} Δ_lj g_j), a logistic regression over the lower layers (the reference's latent
model). A token's log-likelihood ratio is Σ_l log P(g_l | w, g_<l) / P(g_l | not w); a row's `score` is that ratio
summed over its scored tokens (the same positions `detect` scores: prompt, context-less and repeated-context
positions excluded), and its `posterior` is sigmoid(prior logit + score). β, Δ and the prior logit are fitted by
`fit_bayesian` (binary cross-entropy on random prefixes of watermarked vs unwatermarked rows, an L2 penalty on Δ;
optax Adam, all steps in one jitted `lax.scan`).

Calibration. The posterior is not a p-value: `BayesianSynthID.calibrate(clean)` stores the score that every
held-out unwatermarked row reaches after its first n scored tokens, for every n. A row with n scored tokens then
gets the exact conformal p-value (1 + #{null rows with n tokens scoring >= its score}) / (1 + #{null rows with n
tokens}), valid when the null rows are exchangeable with unwatermarked text; a row longer than the calibration
(`max_calibrated_tokens`) is tested on its first that-many scored tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from framework.watermark import base
from framework.watermark.detect import _prepare, _token_mask
from framework.watermark.synthid import SynthID


class BayesianDetection(NamedTuple):
    """Per-row result of `detect_bayesian` ([B] arrays): score (summed log-likelihood ratio), posterior
    P(watermarked | g-values) under the fitted prior, calibrated p-value, scored-token count and the "enough tokens"
    flag (False: score 0, posterior the prior, p-value 1)."""

    score: Float[Array, " B"]
    posterior: Float[Array, " B"]
    p_value: Float[Array, " B"]
    num_scored: Int[Array, " B"]
    enough: Bool[Array, " B"]


class LikelihoodRatio(nn.Module):
    """Per-position log-likelihood ratio log P(g | watermarked) / P(g | not watermarked), summed over layers."""

    depth: int
    g_rate: float

    @nn.compact
    def __call__(self, g_BTM: Float[Array, "B T M"]) -> Float[Array, "B T"]:
        M, f = self.depth, self.g_rate
        beta_M = self.param("beta", lambda k, s: -2.5 + 1e-3 * jax.random.normal(k, s), (M,))
        delta_MM = self.param("delta", lambda k, s: 1e-3 * jax.random.normal(k, s), (M, M))
        # Layer l sees only layers j < l (the autoregressive factorisation of the latent model).
        lower_MM = jnp.tril(delta_MM, k=-1)
        psi_BTM = jax.nn.sigmoid(jnp.einsum("btj,lj->btl", g_BTM, lower_MM) + beta_M)
        p1_BTM = f + psi_BTM * (f * (1.0 - f))
        llr_BTM = g_BTM * (jnp.log(p1_BTM) - np.log(f)) + (1.0 - g_BTM) * (jnp.log1p(-p1_BTM) - np.log1p(-f))
        return jnp.sum(llr_BTM, axis=-1)


class BayesianScorer(nn.Module):
    """Row scores (summed log-likelihood ratio over masked positions) and the learnt prior logit."""

    depth: int
    g_rate: float
    base_rate: float = 0.5

    @nn.compact
    def __call__(self, g_BTM, mask_BT):
        llr_BT = LikelihoodRatio(self.depth, self.g_rate, name="likelihood")(g_BTM)
        prior = self.param(
            "prior_logit", lambda k: jnp.asarray(np.log(self.base_rate / (1 - self.base_rate)), jnp.float32)
        )
        return jnp.sum(jnp.where(mask_BT, llr_BT, 0.0), axis=-1), prior


def bayesian_inputs(scheme: SynthID, tokens_BT, lengths_B=None, start_B=None, *, eos_id: int | None = None):
    """(g-values [B, T, M] float32 aligned to the position of each n-gram's last token, scored mask [B, T] bool):
    the positions `detect(scheme, ...)` scores, with their per-layer g-values."""
    if not isinstance(scheme, SynthID):
        raise ValueError(f"bayesian_inputs: scheme must be a SynthID watermark, got {type(scheme).__name__}")
    tokens, lengths, start = _prepare(scheme, tokens_BT, lengths_B, start_B, 1, "bayesian_inputs")
    return _inputs_jit(tokens, lengths, start, scheme=scheme, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=("scheme", "eos_id"))
def _inputs_jit(tokens_BT, lengths_B, start_B, *, scheme, eos_id):
    C = scheme.ngram_len - 1
    g_BTM = jnp.pad(scheme.g_values(tokens_BT).astype(jnp.float32), ((0, 0), (C, 0), (0, 0)))
    _, scored_BT = _token_mask(
        tokens_BT, lengths_B, start_B, scheme=scheme, weights=None, skip_repeats=False, eos_id=eos_id
    )
    return g_BTM, scored_BT


@dataclasses.dataclass(frozen=True, eq=False)
class BayesianSynthID:
    """A fitted Bayesian detector for one SynthID watermark: `params` (Flax), and after `calibrate` the null table.

    null_NR: [N, R] float32, row n - 1 the scores of the R calibration rows after their first n scored tokens,
    sorted ascending (-inf where a row has fewer than n); null_rows_N: [N] int, how many rows have n.
    """

    scheme: SynthID
    params: Any
    base_rate: float = 0.5
    null_NR: np.ndarray | None = None
    null_rows_N: np.ndarray | None = None

    @property
    def module(self) -> BayesianScorer:
        return BayesianScorer(self.scheme.depth, self.scheme.g_rate, self.base_rate)

    @property
    def max_calibrated_tokens(self) -> int:
        return 0 if self.null_NR is None else int(self.null_NR.shape[0])

    def token_llr(self, g_BTM) -> Float[Array, "B T"]:
        """Per-position log-likelihood ratio (summed over layers)."""
        return _token_llr(self.module, self.params, jnp.asarray(g_BTM, jnp.float32))

    def calibrate(self, clean, *, min_rows: int = 100, eos_id: int | None = None) -> BayesianSynthID:
        """This detector with its null table from held-out unwatermarked text `clean` = (tokens, lengths, start)
        (what `join_generation` returns). Counts n reached by fewer than `min_rows` rows are not calibrated."""
        g, mask = bayesian_inputs(self.scheme, *_triple(clean, "clean"), eos_id=eos_id)
        return self.calibrate_g(g, mask, min_rows=min_rows)

    def calibrate_g(self, g_RTM, mask_RT, *, min_rows: int = 100) -> BayesianSynthID:
        """`calibrate` from the g-values [R, T, M] and scored mask [R, T] of unwatermarked rows."""
        min_rows = base.check_int("min_rows", min_rows, 1, where="calibrate")
        llr = np.asarray(self.token_llr(g_RTM), np.float64)
        mask = np.asarray(mask_RT, bool)
        counts = mask.sum(1)
        rows_with_n = (counts[None, :] >= np.arange(1, int(counts.max(initial=0)) + 1)[:, None]).sum(1)
        n_max = int(np.sum(rows_with_n >= min_rows))  # non-increasing in n
        if n_max == 0:
            raise ValueError(
                f"calibrate: clean has {len(counts)} rows with at most {int(counts.max(initial=0))} scored tokens; "
                f"expected >= min_rows={min_rows} rows with at least one scored token"
            )
        table = np.full((n_max, len(counts)), -np.inf, np.float32)
        for r in range(len(counts)):
            run = np.cumsum(llr[r][mask[r]])[:n_max]
            table[: len(run), r] = run
        table.sort(axis=1)
        rows = np.isfinite(table).sum(1).astype(np.int32)
        return dataclasses.replace(self, null_NR=table, null_rows_N=rows)


def _triple(x, name):
    if not isinstance(x, (tuple, list)) or len(x) != 3:
        raise ValueError(f"{name} must be a (tokens [B, T], lengths [B], start [B]) triple, as join_generation returns")
    return x


@functools.partial(jax.jit, static_argnums=(0,))
def _token_llr(module, params, g_BTM):
    return _llr(module, params, g_BTM)


def _llr(module, params, g_BTM):
    return LikelihoodRatio(module.depth, module.g_rate).apply({"params": params["params"]["likelihood"]}, g_BTM)


def fit_bayesian(
    scheme: SynthID,
    marked,
    clean,
    *,
    eos_id: int | None = None,
    **fit_kw,
) -> BayesianSynthID:
    """Fits the Bayesian detector on watermarked `marked` and unwatermarked `clean` text, each a (tokens [B, T],
    lengths [B], start [B]) triple (the prompt before start is context only). Returns an uncalibrated detector:
    call `.calibrate(held_out_clean)` before reading p-values. `fit_kw`: see `fit_bayesian_g`."""
    if not isinstance(scheme, SynthID):
        raise ValueError(f"fit_bayesian: scheme must be a SynthID watermark, got {type(scheme).__name__}")
    parts = []
    for name, x in (("marked", marked), ("clean", clean)):
        g, m = bayesian_inputs(scheme, *_triple(x, name), eos_id=eos_id)
        if not np.asarray(m).any():
            raise ValueError(f"fit_bayesian: {name} has no scored tokens (too short, or all prompt)")
        parts.append((g, m))
    T = max(g.shape[1] for g, _ in parts)
    pad = lambda a, v: jnp.pad(a, [(0, 0), (0, T - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=v)  # noqa: E731
    g_RTM = jnp.concatenate([pad(g, 0.0) for g, _ in parts])
    mask_RT = jnp.concatenate([pad(m, False) for _, m in parts])
    labels_R = np.concatenate([np.ones(parts[0][0].shape[0]), np.zeros(parts[1][0].shape[0])])
    return fit_bayesian_g(scheme, g_RTM, mask_RT, labels_R, **fit_kw)


def fit_bayesian_g(
    scheme: SynthID,
    g_RTM,
    mask_RT,
    labels_R,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    l2: float = 1.0,
    base_rate: float = 0.5,
    seed: int = 0,
) -> BayesianSynthID:
    """Fits the detector on g-values g_RTM [R, T, M] (0/1), scored positions mask_RT [R, T] and labels_R [R] (1
    watermarked, 0 not): `steps` Adam steps on minibatches of `batch_size` rows, each row cut to its first k scored
    tokens (k log-uniform in [1, its count]), binary cross-entropy of the posterior plus `l2` * Σ Δ², in one jitted
    scan."""
    where = "fit_bayesian"
    if not isinstance(scheme, SynthID):
        raise ValueError(f"{where}: scheme must be a SynthID watermark, got {type(scheme).__name__}")
    steps = base.check_int("steps", steps, 1, where=where)
    batch_size = base.check_int("batch_size", batch_size, 1, where=where)
    base.check_int("seed", seed, 0, where=where)
    for name, value, ok, expected in (
        ("learning_rate", learning_rate, lambda v: v > 0, "a float > 0"),
        ("l2", l2, lambda v: v >= 0, "a float >= 0"),
        ("base_rate", base_rate, lambda v: 0 < v < 1, "a float in (0, 1)"),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"{where}: {name}={value!r}: expected {expected}")
    g_RTM = jnp.asarray(g_RTM, jnp.float32)
    mask_RT = jnp.asarray(mask_RT, bool)
    labels = np.asarray(labels_R, np.float32).reshape(-1)
    if g_RTM.ndim != 3 or g_RTM.shape[2] != scheme.depth:
        raise ValueError(
            f"{where}: g-values have shape {g_RTM.shape}; expected [R, T, {scheme.depth}] (one per key, "
            f"len(keys)={scheme.depth})"
        )
    if mask_RT.shape != g_RTM.shape[:2] or labels.shape != g_RTM.shape[:1]:
        raise ValueError(f"{where}: mask {mask_RT.shape} and labels {labels.shape} must be [R, T] and [R]")
    if not (np.isin(labels, (0.0, 1.0)).all() and 0 < labels.sum() < len(labels)):
        raise ValueError(f"{where}: labels must be 0/1 with both classes present, got {np.unique(labels)}")
    module = BayesianScorer(scheme.depth, scheme.g_rate, float(base_rate))
    key_init, key_steps = jax.random.split(jax.random.key(seed))
    params = module.init(key_init, g_RTM[:1], mask_RT[:1])
    batch = min(batch_size, len(labels))
    params = _fit_jit(module, params, g_RTM, mask_RT, jnp.asarray(labels), key_steps, steps, batch, learning_rate, l2)
    return BayesianSynthID(scheme, jax.device_get(params), float(base_rate))


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _fit_jit(module, params, g_RTM, mask_RT, y_R, key, steps, batch, learning_rate, l2):
    opt = optax.adam(learning_rate)
    count_RT = jnp.cumsum(mask_RT.astype(jnp.int32), axis=1)
    n_R = count_RT[:, -1].astype(jnp.float32)

    def loss_fn(p, idx, u):
        # Each drawn row keeps its first k scored tokens, k log-uniform in [1, n]: long rows alone are separable by
        # almost any parameters (the loss saturates), short prefixes keep the per-token likelihood informative.
        keep_B = jnp.floor(jnp.exp(u * jnp.log(jnp.maximum(n_R[idx], 1.0)))) + 1.0
        mask_BT = mask_RT[idx] & (count_RT[idx] <= keep_B[:, None])
        score, prior = module.apply(p, g_RTM[idx], mask_BT)
        bce = optax.sigmoid_binary_cross_entropy(prior + score, y_R[idx]).mean()
        return bce + l2 * jnp.sum(p["params"]["likelihood"]["delta"] ** 2)

    def step(carry, k):
        p, s = carry
        k_idx, k_len = jax.random.split(k)
        idx = jax.random.choice(k_idx, y_R.shape[0], (batch,), replace=False)
        grads = jax.grad(loss_fn)(p, idx, jax.random.uniform(k_len, (batch,)))
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
    return params


def detect_bayesian(
    detector: BayesianSynthID, tokens_BT, lengths_B=None, start_B=None, *, min_tokens: int = 1, eos_id=None
) -> BayesianDetection:
    """Scores each row of `tokens_BT` with a fitted, calibrated Bayesian detector (one jitted batch); see
    `BayesianDetection`. The positions scored are `detect`'s for the same scheme."""
    if not isinstance(detector, BayesianSynthID):
        raise ValueError(f"detect_bayesian: detector must be a BayesianSynthID (fit_bayesian), got {type(detector)}")
    if detector.null_NR is None:
        raise ValueError("detect_bayesian: detector.null_NR is None: call detector.calibrate(held_out_clean) first")
    base.check_int("min_tokens", min_tokens, 1, where="detect_bayesian")
    delta = np.shape(detector.params["params"]["likelihood"]["delta"])
    if delta != (detector.scheme.depth,) * 2:
        raise ValueError(
            f"detect_bayesian: the detector's params are for depth {delta[0]} but its scheme has "
            f"len(keys)={detector.scheme.depth}: fit it for this key set"
        )
    tokens, lengths, start = _prepare(detector.scheme, tokens_BT, lengths_B, start_B, 1, "detect_bayesian")
    null_NR, rows_N = jnp.asarray(detector.null_NR), jnp.asarray(detector.null_rows_N)
    return _detect_jit(
        detector.scheme, detector.module, detector.params, tokens, lengths, start, null_NR, rows_N, min_tokens, eos_id
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 8, 9))
def _detect_jit(scheme, module, params, tokens_BT, lengths_B, start_B, null_NR, rows_N, min_tokens, eos_id):
    g_BTM, mask_BT = _inputs_jit(tokens_BT, lengths_B, start_B, scheme=scheme, eos_id=eos_id)
    llr_BT = jnp.where(mask_BT, _llr(module, params, g_BTM), 0.0)
    score_B = jnp.sum(llr_BT, axis=1)
    count_BT = jnp.cumsum(mask_BT.astype(jnp.int32), axis=1)
    n_B = count_BT[:, -1]
    # Rows longer than the calibration are tested on their first N scored tokens.
    n_eff_B = jnp.minimum(n_B, null_NR.shape[0])
    prefix_B = jnp.sum(jnp.where(count_BT <= n_eff_B[:, None], llr_BT, 0.0), axis=1)
    null_BR = null_NR[jnp.maximum(n_eff_B - 1, 0)]
    # Scores are sums of a few discrete values, so ties are common; the table and the row are summed in different
    # orders: a null score within rounding of the row's counts as >= it (conservative).
    tol_B = 1e-4 * (1.0 + jnp.abs(prefix_B))
    below_B = jax.vmap(lambda row, s: jnp.searchsorted(row, s, side="left"))(null_BR, prefix_B - tol_B)
    at_least_B = null_NR.shape[1] - below_B  # null rows (with n tokens) scoring >= the row
    p_B = (1.0 + at_least_B) / (1.0 + rows_N[jnp.maximum(n_eff_B - 1, 0)])
    prior = params["params"]["prior_logit"]
    enough_B = n_B >= min_tokens
    return BayesianDetection(
        jnp.where(enough_B, score_B, 0.0),
        jax.nn.sigmoid(prior + jnp.where(enough_B, score_B, 0.0)),
        jnp.where(enough_B, jnp.minimum(p_B, 1.0), 1.0),
        n_B.astype(jnp.int32),
        enough_B,
    )
