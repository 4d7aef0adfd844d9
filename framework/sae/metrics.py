"""SAE metrics, each with one definition (stated in its docstring and pinned by tests/test_sae_metrics.py).

Rows are tokens: x, x_hat are [N, D] (the target and its reconstruction), latents [N, L]. Everything works on
numpy or jax arrays and inside jit; aggregates are over all N tokens of the batch given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-12


def l0(latents) -> jax.Array:
    """L0: the mean over tokens of the number of non-zero latents."""
    return jnp.mean(jnp.sum((jnp.asarray(latents) != 0).astype(jnp.float32), axis=-1))


def explained_variance(x, x_hat) -> jax.Array:
    """1 - FVU, FVU = sum_{n,d} (x - x_hat)^2 / sum_{n,d} (x - mean_n x)^2 (deviations from the batch mean).

    Predicting the batch mean for every token gives exactly 0; a perfect reconstruction gives 1.
    """
    x, x_hat = jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32)
    sse = jnp.sum((x - x_hat) ** 2)
    sst = jnp.sum((x - jnp.mean(x, axis=0)) ** 2)
    return 1.0 - sse / jnp.maximum(sst, _EPS)


def fvu(x, x_hat) -> jax.Array:
    """Fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - batch mean of x)^2 = 1 - explained_variance."""
    return 1.0 - explained_variance(x, x_hat)


def nmse(x, x_hat) -> jax.Array:
    """Normalised MSE: sum_{n,d} (x - x_hat)^2 / sum_{n,d} x^2 (relative to the raw, uncentred squared norm)."""
    x, x_hat = jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32)
    return jnp.sum((x - x_hat) ** 2) / jnp.maximum(jnp.sum(x**2), _EPS)


def cosine_similarity(x, x_hat) -> jax.Array:
    """The mean over tokens of <x, x_hat> / (||x|| ||x_hat||) (a zero vector counts as cosine 0)."""
    x, x_hat = jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32)
    num = jnp.sum(x * x_hat, axis=-1)
    den = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(x_hat, axis=-1)
    return jnp.mean(jnp.where(den > 0, num / jnp.maximum(den, _EPS), 0.0))


def shrinkage(x, x_hat) -> jax.Array:
    """The mean over tokens of ||x_hat|| / ||x|| (below 1: the reconstruction is shrunk; tokens with x = 0 skipped)."""
    x, x_hat = jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32)
    nx, nh = jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(x_hat, axis=-1)
    ok = nx > 0
    return jnp.sum(jnp.where(ok, nh / jnp.maximum(nx, _EPS), 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def feature_density(latents) -> jax.Array:
    """Per latent [L]: the fraction of tokens on which it is non-zero."""
    return jnp.mean((jnp.asarray(latents) != 0).astype(jnp.float32), axis=0)


def dead_latents(latents, window: int | None = None) -> jax.Array:
    """Per latent [L] bool: True if it is zero on every one of the last `window` tokens (all tokens if None).

    Tokens are rows in stream order; a window longer than the rows given is an error (it cannot be decided).
    """
    latents = jnp.asarray(latents)
    n = latents.shape[0]
    if window is not None:
        if window <= 0 or window > n:
            raise ValueError(f"dead-latent window = {window} tokens; expected 1 <= window <= {n} (the rows given)")
        latents = latents[n - window :]
    return ~jnp.any(latents != 0, axis=0)


def dead_fraction(latents, window: int | None = None) -> jax.Array:
    """The fraction of latents that are dead over the last `window` tokens (see `dead_latents`)."""
    return jnp.mean(dead_latents(latents, window).astype(jnp.float32))


def density_histogram(latents, bins: int = 20, lo: float = -6.0) -> dict[str, Any]:
    """Histogram of log10(feature density) over the latents that fire; dead ones (density 0) counted apart.

    Returns {"counts": [bins], "edges": [bins + 1] in log10 units spanning [lo, 0], "dead": int}; densities below
    10**lo land in the first bin.
    """
    d = np.asarray(feature_density(latents))
    alive = d[d > 0]
    counts, edges = np.histogram(np.clip(np.log10(alive), lo, 0.0), bins=bins, range=(lo, 0.0))
    return {"counts": counts.tolist(), "edges": edges.tolist(), "dead": int(np.sum(d == 0))}


def reconstruction_metrics(x, x_hat, latents) -> dict[str, float]:
    """The per-batch metrics above as floats: l0, explained_variance, fvu, nmse, cosine, shrinkage, dead_fraction."""
    return {
        "l0": float(l0(latents)),
        "explained_variance": float(explained_variance(x, x_hat)),
        "fvu": float(fvu(x, x_hat)),
        "nmse": float(nmse(x, x_hat)),
        "cosine": float(cosine_similarity(x, x_hat)),
        "shrinkage": float(shrinkage(x, x_hat)),
        "dead_fraction": float(dead_fraction(latents)),
    }


def firing_counts(sae_params, sae_cfg, x_in, *, chunk: int = 8192) -> np.ndarray:
    """Per latent [L] int: on how many rows of `x_in` it is non-zero (chunked: never holds all [N, L] latents).

    `firing_counts(...) == 0` is "dead over a window of len(x_in) tokens"; use a window of many times 1/density
    of the rarest latent worth keeping, else rare latents count as dead.
    """
    from framework.sae import model

    count = jax.jit(lambda p, x: jnp.sum(model.encode(p, sae_cfg, x) != 0, axis=0, dtype=jnp.int32))
    total = np.zeros(sae_cfg.n_latents, np.int64)
    for i in range(0, len(x_in), chunk):
        total += np.asarray(count(sae_params, jnp.asarray(x_in[i : i + chunk], jnp.float32)))
    return total


def evaluate(sae_params, sae_cfg, x_in, y_out=None, *, chunk: int = 4096) -> dict[str, Any]:
    """`reconstruction_metrics` of the SAE on (x_in -> y_out; y_out = x_in for an SAE) plus the density histogram.

    dead_fraction here is over all the rows given (no firing on any of them).
    """
    from framework.sae import model

    y_out = x_in if y_out is None else y_out
    enc = jax.jit(lambda p, x: model.encode(p, sae_cfg, x))
    dec = jax.jit(lambda p, f: model.decode(p, sae_cfg, f))
    lat, rec = [], []
    for i in range(0, len(x_in), chunk):
        f = enc(sae_params, jnp.asarray(x_in[i : i + chunk], jnp.float32))
        lat.append(np.asarray(f))
        rec.append(np.asarray(dec(sae_params, f)))
    latents, y_hat = np.concatenate(lat), np.concatenate(rec)
    out = reconstruction_metrics(np.asarray(y_out, np.float32), y_hat, latents)
    out["density_histogram"] = density_histogram(latents)
    out["n_tokens"] = int(len(x_in))
    return out


def ce_loss_recovered(clean_loss: float, sae_loss: float, zero_ablation_loss: float) -> float | None:
    """(L_zero - L_sae) / (L_zero - L_clean), or None (undefined) when zero-ablating the hookpoint does not raise
    the loss (L_zero <= L_clean): the ratio then has no meaning (a sign flip or a division by ~0), which happens on
    imported models whose residual stream at that layer the next layers barely need."""
    if not zero_ablation_loss > clean_loss:
        return None
    return (zero_ablation_loss - sae_loss) / (zero_ablation_loss - clean_loss)


def spliced_lm_loss(
    lm_params,
    model_cfg,
    batch: Mapping[str, Any],
    sae_params,
    sae_cfg,
    *,
    hookpoint: str | None = None,
    in_hookpoint: str | None = None,
) -> dict[str, float]:
    """LM next-token loss clean, with the SAE's reconstruction spliced in at its hookpoint, and zero-ablated there.

    ce_loss_recovered = (L_zero - L_sae) / (L_zero - L_clean): 1 when the SAE is as good as the real activation,
    0 when it is no better than zeros; None (undefined, `ce_loss_recovered_defined` False) when zero ablation does
    not raise the loss (`ce_loss_recovered`). delta_lm_loss = L_sae - L_clean. A transcoder reads `in_hookpoint` (from
    the clean pass; it must come before `hookpoint`) and replaces `hookpoint`. `batch` holds tokens and loss_mask
    (and positions/segment_ids for packed rows).
    """
    from framework.models import lm
    from framework.sae import model
    from framework.training.loss import next_token_loss

    hookpoint = hookpoint or sae_cfg.out_hookpoint or sae_cfg.hookpoint
    in_hookpoint = in_hookpoint or (sae_cfg.hookpoint if sae_cfg.out_hookpoint else None)
    names = lm.hookpoints(lm.LMConfig.from_config(model_cfg))
    for name in filter(None, (hookpoint, in_hookpoint)):
        if name not in names:
            raise ValueError(f"unknown hookpoint {name!r}; expected one of {list(names)}")
    if hookpoint is None:
        raise ValueError("spliced_lm_loss needs a hookpoint (argument or sae_cfg.hookpoint)")
    if in_hookpoint is not None and names.index(in_hookpoint) >= names.index(hookpoint):
        raise ValueError(f"transcoder input {in_hookpoint!r} must come before its output hookpoint {hookpoint!r}")
    tokens = jnp.asarray(batch["tokens"])
    pairs = (("positions_BT", "positions"), ("segment_ids_BT", "segment_ids"))
    kw = {k: jnp.asarray(batch[v]) for k, v in pairs if v in batch}
    mask = jnp.asarray(batch["loss_mask"])

    def loss(lm_p, interventions, capture=()):
        out = lm.forward(lm_p, tokens, model_cfg, interventions=interventions, capture=capture, **kw)
        return next_token_loss(out.logits, tokens, mask)[0], out.captured

    def reconstruct(sae_p, a):
        return model.decode(sae_p, sae_cfg, model.encode(sae_p, sae_cfg, a)).astype(a.dtype)

    @jax.jit
    def run(lm_p, sae_p):
        clean, captured = loss(lm_p, {}, capture=(in_hookpoint,) if in_hookpoint else ())
        if in_hookpoint:
            replacement = reconstruct(sae_p, captured[in_hookpoint])
            spliced = loss(lm_p, {hookpoint: lambda a: replacement.astype(a.dtype)})[0]
        else:
            spliced = loss(lm_p, {hookpoint: lambda a: reconstruct(sae_p, a)})[0]
        zero = loss(lm_p, {hookpoint: jnp.zeros_like})[0]
        return clean, spliced, zero

    clean, spliced, zero = (float(v) for v in run(lm_params, sae_params))
    return {
        "clean_loss": clean,
        "sae_loss": spliced,
        "zero_ablation_loss": zero,
        "ce_loss_recovered": ce_loss_recovered(clean, spliced, zero),
        "ce_loss_recovered_defined": zero > clean,
        "delta_lm_loss": spliced - clean,
    }
