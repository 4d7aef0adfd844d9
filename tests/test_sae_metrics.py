"""framework.sae.metrics: each definition on hand-made cases, and the LM splice (CE loss recovered, delta loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import sae
from framework.models import lm
from framework.sae import metrics as M

X = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])


def test_explained_variance_definition():
    mean = np.broadcast_to(X.mean(axis=0), X.shape)
    assert float(M.explained_variance(X, mean)) == pytest.approx(0.0, abs=1e-7)  # predicting the batch mean
    assert float(M.explained_variance(X, X)) == 1.0
    x_hat = X + np.array([[1.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
    sst = np.sum((X - X.mean(0)) ** 2)  # 8 + 8.6667
    assert float(M.fvu(X, x_hat)) == pytest.approx(2.0 / sst, rel=1e-6)
    assert float(M.explained_variance(X, x_hat)) == pytest.approx(1 - 2.0 / sst, rel=1e-6)


def test_nmse_cosine_shrinkage():
    x_hat = 0.5 * X
    assert float(M.nmse(X, x_hat)) == pytest.approx(0.25, rel=1e-6)  # ||x/2||^2 / ||x||^2, uncentred
    assert float(M.cosine_similarity(X, x_hat)) == pytest.approx(1.0, rel=1e-6)
    assert float(M.shrinkage(X, x_hat)) == pytest.approx(0.5, rel=1e-6)
    orth = np.array([[2.0, -1.0], [-4.0, 3.0], [0.0, 5.0]])
    assert float(M.cosine_similarity(X, orth)) == pytest.approx(0.0, abs=1e-7)
    assert float(M.cosine_similarity(X, np.zeros_like(X))) == 0.0
    # per-token ratios averaged: (2 + 1 + 0.5) / 3
    assert float(M.shrinkage(X, X * np.array([[2.0], [1.0], [0.5]]))) == pytest.approx(3.5 / 3, rel=1e-6)


def test_l0_density_dead():
    f = np.array([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [5.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    assert float(M.l0(f)) == pytest.approx((2 + 1 + 2 + 1) / 4)
    np.testing.assert_allclose(M.feature_density(f), [0.25, 0.25, 0.0, 1.0])
    np.testing.assert_array_equal(M.dead_latents(f), [False, False, True, False])
    np.testing.assert_array_equal(M.dead_latents(f, window=2), [False, True, True, False])  # last 2 tokens
    np.testing.assert_array_equal(M.dead_latents(f, window=1), [True, True, True, False])
    assert float(M.dead_fraction(f, window=2)) == 0.5
    with pytest.raises(ValueError, match="window = 5 tokens; expected 1 <= window <= 4"):
        M.dead_latents(f, window=5)
    h = M.density_histogram(f, bins=6, lo=-3.0)
    assert h["dead"] == 1 and sum(h["counts"]) == 3
    assert h["counts"][-1] == 1  # density 1.0 -> log10 = 0, the last bin
    assert h["counts"][4] == 2  # density 0.25 -> log10 = -0.6 lies in [-1, -0.5)


def _identity_topk(d):
    """A TopK SAE that reconstructs exactly: latents (x, -x), k = d keeps the positive one of each pair."""
    cfg = sae.default_config("topk", d_in=d, n_latents=2 * d, k=d)
    eye = jnp.eye(d)
    params = {
        "W_enc": jnp.concatenate([eye, -eye], axis=1),
        "b_enc": jnp.zeros(2 * d),
        "W_dec": jnp.concatenate([eye, -eye], axis=0),
        "b_dec": jnp.zeros(d),
    }
    return params, cfg


@pytest.fixture(scope="module")
def tiny_lm(tiny_cfg):
    params = lm.init(tiny_cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 3, 24)
    return params, {"tokens": tokens, "loss_mask": jnp.ones((4, 16))}


def test_spliced_loss_perfect_and_zero_sae(tiny_cfg, tiny_lm):
    params, batch = tiny_lm
    sae_params, cfg = _identity_topk(tiny_cfg.d_model)
    x = np.random.default_rng(0).normal(size=(5, tiny_cfg.d_model))
    np.testing.assert_allclose(sae.decode(sae_params, cfg, sae.encode(sae_params, cfg, x)), x, atol=1e-6)
    out = M.spliced_lm_loss(params, tiny_cfg, batch, sae_params, cfg, hookpoint="blocks.0.resid_post")
    assert out["sae_loss"] == pytest.approx(out["clean_loss"], abs=1e-5)
    losses = lambda o: (o["clean_loss"], o["sae_loss"], o["zero_ablation_loss"])  # noqa: E731
    ratio = lambda clean, spliced, zero: (zero - spliced) / (zero - clean)  # noqa: E731
    assert ratio(*losses(out)) == pytest.approx(1.0, abs=1e-3)
    # Reported only where zero ablation raises the loss (on this random LM it need not): else None, flagged.
    assert out["ce_loss_recovered"] == M.ce_loss_recovered(*losses(out))
    assert out["ce_loss_recovered_defined"] == (out["zero_ablation_loss"] > out["clean_loss"])
    assert out["delta_lm_loss"] == pytest.approx(0.0, abs=1e-5)
    assert out["zero_ablation_loss"] != pytest.approx(out["clean_loss"], abs=1e-3)
    zero = dict(sae_params, W_dec=jnp.zeros_like(sae_params["W_dec"]))
    out0 = M.spliced_lm_loss(params, tiny_cfg, batch, zero, cfg, hookpoint="blocks.0.resid_post")
    assert ratio(*losses(out0)) == pytest.approx(0.0, abs=1e-4)
    assert out0["delta_lm_loss"] == pytest.approx(out0["zero_ablation_loss"] - out0["clean_loss"], abs=1e-5)


def test_spliced_transcoder_uses_input_hookpoint(tiny_cfg, tiny_lm):
    params, batch = tiny_lm
    sae_params, cfg = _identity_topk(tiny_cfg.d_model)
    cfg.update(hookpoint="blocks.1.resid_mid", out_hookpoint="blocks.1.resid_post", d_out=tiny_cfg.d_model)
    # An identity map from resid_mid to resid_post removes the MLP's contribution: not the clean loss.
    out = M.spliced_lm_loss(params, tiny_cfg, batch, sae_params, cfg)
    ref = lm.forward(params, batch["tokens"], tiny_cfg, capture=("blocks.1.resid_mid",)).captured["blocks.1.resid_mid"]
    manual = lm.apply(params, batch["tokens"], tiny_cfg, interventions={"blocks.1.resid_post": lambda a: ref})
    from framework.training.loss import next_token_loss

    assert out["sae_loss"] == pytest.approx(float(next_token_loss(manual, batch["tokens"], batch["loss_mask"])[0]))
    with pytest.raises(ValueError, match="must come before"):
        cfg.update(hookpoint="blocks.1.resid_post", out_hookpoint="blocks.0.resid_post")
        M.spliced_lm_loss(params, tiny_cfg, batch, sae_params, cfg)


def test_ce_loss_recovered_is_undefined_when_ablation_does_not_hurt():
    assert M.ce_loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert M.ce_loss_recovered(2.0, 2.0, 2.0) is None  # no gap: the ratio is 0 / 0
    assert M.ce_loss_recovered(2.0, 2.1, 1.5) is None  # ablation helps: a ratio would flip sign and mean nothing
