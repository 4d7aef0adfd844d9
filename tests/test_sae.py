"""SAE library: dictionary recovery on synthetic sparse data, architecture mechanics, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.sae import jumprelu
from experiments import sae as sae_exp
from framework import sae
from framework.config import ConfigError
from framework.sae import defaults, model, train


def synthetic(n=20000, d=32, m=128, k=4, seed=0):
    """Rows = sparse positive combinations (k of m unit atoms, magnitudes U[0.5, 1.5]); returns (x, atoms)."""
    r = np.random.default_rng(seed)
    atoms = r.normal(size=(m, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(r.random((n, m)), axis=1)[:, :k]
    codes = np.zeros((n, m))
    np.put_along_axis(codes, idx, r.uniform(0.5, 1.5, size=(n, k)), axis=1)
    return (codes @ atoms).astype(np.float32), atoms


@pytest.fixture(scope="module")
def data():
    return synthetic()


def mean_best_cosine(atoms, sae_params, cfg):
    dirs = np.asarray(sae.decoder_directions(sae_params, cfg))
    assert dirs.shape == (cfg.n_latents, cfg.d_in)
    return float((atoms @ dirs.T).max(axis=1).mean())


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_recovers_known_dictionary(data, arch):
    x, atoms = data
    cfg = sae.default_config(arch, d_in=32, n_latents=256)
    if arch == "topk":
        cfg.k = 4
    params, metrics = sae.fit(x, cfg, steps=2000, batch_size=256, seed=0)
    score = mean_best_cosine(atoms, params, cfg)
    assert score >= 0.9, (arch, score, metrics["final"])
    assert metrics["final"]["fvu"] < 0.3
    if arch == "jumprelu":  # the threshold learned: L0 near the true 4 active atoms (it starts far above)
        assert params["log_threshold"].dtype == jnp.float32
        moved = np.abs(np.asarray(params["log_threshold"]) - np.log(cfg.jumprelu_init_threshold))
        assert moved.mean() > 0.1, moved.mean()  # thresholds moved under Adam (log parameterisation)
        assert 2 <= metrics["final"]["l0"] <= 8, metrics["final"]


def test_batchtopk_inference_threshold_gives_about_k(data):
    x, _ = data
    cfg = sae.default_config("batchtopk", d_in=32, n_latents=128, k=4)
    params, metrics = sae.fit(x[:8000], cfg, steps=600, batch_size=256, seed=1)
    assert float(params["threshold"]) > 0
    # encode() uses the learned threshold, not the batch top-k: per-token L0 varies but averages near k.
    l0 = float(sae.metrics.l0(sae.encode(params, cfg, x[:4000])))
    assert 0.5 * 4 <= l0 <= 1.5 * 4, l0
    assert metrics["history"][-1]["l0"] == pytest.approx(4.0)


def test_transcoder_fits_a_map(data):
    x, _ = data
    r = np.random.default_rng(3)
    A = r.normal(size=(32, 16)).astype(np.float32) / 4
    y = x[:8000] @ A + 0.5  # different width and an offset: b_dec must not be subtracted from the input
    cfg = sae.default_config("topk", d_in=32, n_latents=128, k=8, d_out=16)
    params, metrics = sae.fit((x[:8000], y), cfg, steps=800, batch_size=256, seed=0)
    assert params["W_dec"].shape == (128, 16) and params["W_enc"].shape == (32, 128)
    y_hat = sae.decode(params, cfg, sae.encode(params, cfg, x[:2000]))
    assert float(sae.metrics.fvu(y[:2000], y_hat)) == pytest.approx(metrics["final"]["fvu"], abs=0.05)
    assert metrics["final"]["fvu"] < 0.2, metrics["final"]


def test_fold_scales_makes_raw_inputs_equivalent():
    cfg = sae.default_config("jumprelu", d_in=8, n_latents=16)
    p = model.init_params(cfg, jax.random.key(0))
    p = dict(p, b_dec=jnp.arange(8.0) / 10, b_enc=jnp.full(16, 0.1), log_threshold=jnp.full(16, -3.0))
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32) * 7
    s = 0.3
    folded = train.fold_scales(p, cfg, s, s)
    np.testing.assert_allclose(sae.encode(folded, cfg, x), sae.encode(p, cfg, x * s), rtol=1e-5, atol=1e-5)
    x_hat = sae.decode(folded, cfg, sae.encode(folded, cfg, x))
    np.testing.assert_allclose(x_hat, sae.decode(p, cfg, sae.encode(p, cfg, x * s)) / s, rtol=1e-4, atol=1e-4)


def test_jumprelu_pseudo_gradients():
    z = jnp.array([[0.9, 1.02, 1.5]])
    theta = jnp.array([1.0, 1.0, 1.0])
    eps = 0.1
    dz, dth = jax.grad(lambda z, t: jnp.sum(model.jumprelu(z, t, eps)), argnums=(0, 1))(z, theta)
    np.testing.assert_allclose(dz, [[0.0, 1.0, 1.0]])
    # d/dtheta = -(theta/eps) * rect((z - theta)/eps): only |z - theta| < eps/2 contributes
    np.testing.assert_allclose(dth, [0.0, -10.0, 0.0], rtol=1e-6)
    dz, dth = jax.grad(lambda z, t: jnp.sum(model.step(z, t, eps)), argnums=(0, 1))(z, theta)
    np.testing.assert_allclose(dz, [[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(dth, [0.0, -10.0, 0.0], rtol=1e-6)


def test_geometric_median_ignores_an_outlier():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    med = model.geometric_median(pts)
    assert np.linalg.norm(med - [0.5, 0.5]) < 0.6 < np.linalg.norm(pts.mean(0) - [0.5, 0.5])


def test_lr_schedule_warmup_and_decay():
    cfg = sae.default_config("topk", lr=1.0, lr_warmup_steps=10, lr_decay="linear", lr_decay_frac=0.2)
    sched = train.lr_schedule(cfg, 100)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(50)) == 1.0 and float(sched(80)) == 1.0
    assert float(sched(90)) == pytest.approx(0.5) and float(sched(100)) == pytest.approx(0.0)


def test_tied_init_and_decoder_norm():
    cfg = sae.default_config("topk", d_in=8, n_latents=32)
    p = model.init_params(cfg, jax.random.key(0))
    np.testing.assert_allclose(p["W_enc"], p["W_dec"].T)
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-5)
    untied = model.init_params(sae.default_config("topk", d_in=8, n_latents=32, tied_init=False), jax.random.key(0))
    assert not np.allclose(untied["W_enc"], untied["W_dec"].T)


# ---- bad input: errors name the value and what was expected, before anything compiles ----


@pytest.fixture
def no_compile(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("compiled or initialised before validating the input")

    monkeypatch.setattr(model, "init_params", fail)
    monkeypatch.setattr(train.jax, "jit", fail)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_activations(no_compile, bad):
    x = np.ones((64, 8), np.float32)
    x[7, 3] = bad
    with pytest.raises(ValueError, match=r"non-finite value \((nan|inf|-inf)\) at row 7, column 3"):
        sae.fit(x, sae.default_config("topk", d_in=8, n_latents=16, k=2), steps=2, batch_size=8)


def test_d_in_mismatch(no_compile):
    x = np.ones((64, 12), np.float32)
    with pytest.raises(ValueError, match=r"width 12 but sae.d_in = 8"):
        sae.fit(x, sae.default_config("topk", d_in=8, n_latents=16, k=2), steps=2, batch_size=8)


def test_unknown_arch():
    with pytest.raises(ValueError, match=r"unknown SAE architecture 'vanilla'.*'relu', 'topk'"):
        sae.default_config("vanilla")
    cfg = sae.default_config("topk")
    cfg.arch = "vanilla"
    with pytest.raises(ValueError, match=r"sae.arch='vanilla'"):
        defaults.validate(cfg)


def test_bad_config_values(no_compile):
    x = np.ones((64, 8), np.float32)
    with pytest.raises(ValueError, match=r"sae.k = 32 exceeds sae.n_latents = 16"):
        sae.fit(x, sae.default_config("topk", d_in=8, n_latents=16, k=32), steps=2, batch_size=8)
    with pytest.raises(ValueError, match=r"unknown SAE config key\(s\) \['width'\]"):
        sae.default_config("topk", width=3)


def test_hookpoint_checks(tiny_cfg):
    from framework.sae import store

    with pytest.raises(ValueError, match=r"unknown hookpoint sae.hookpoint = 'blocks.7.resid_post'.*blocks.<0..1>"):
        store.check_hookpoints(sae.default_config("topk", d_in=32, hookpoint="blocks.7.resid_post"), tiny_cfg)
    with pytest.raises(ValueError, match=r"sae.d_in = 64 does not match hookpoint 'blocks.1.resid_post'.*d_model = 32"):
        store.check_hookpoints(sae.default_config("topk", d_in=64, hookpoint="blocks.1.resid_post"), tiny_cfg)
    store.check_hookpoints(sae.default_config("topk", d_in=32, hookpoint="blocks.1.resid_post"), tiny_cfg)


def test_auxk_gradient_reaches_dead_latents_only():
    cfg = sae.default_config("topk", d_in=8, n_latents=32, k=2, aux_k=4, aux_k_coeff=1.0)
    p = model.init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 8))
    dead = jnp.arange(32) < 8

    def aux(p, dead):
        return model.losses(p, cfg, x, x, 1.0, dead)[1]["aux_loss"]

    g = jax.grad(aux)(p, dead)
    assert float(jnp.abs(g["W_enc"][:, :8]).sum()) > 0 and float(jnp.abs(g["W_enc"][:, 8:]).sum()) == 0
    assert float(aux(p, jnp.zeros(32, bool))) == 0.0  # nothing dead: no aux loss


def test_experiment_config_errors_before_compile(no_compile):
    config = jumprelu.get_config()
    config.unlock()
    config.sae.hookpoint = "blocks.9.resid_post"
    with pytest.raises(ConfigError, match=r"unknown hookpoint sae.hookpoint = 'blocks.9.resid_post'"):
        sae_exp.validate(config)
    config = jumprelu.get_config()
    config.unlock()
    config.sae.d_in = 32
    with pytest.raises(ConfigError, match=r"sae.d_in = 32 does not match hookpoint 'blocks.1.resid_post'.*= 64"):
        sae_exp.validate(config)
    config = jumprelu.get_config("hookpoint=blocks.0.attn_out")
    assert sae_exp.validate(config).d_model == 64


def test_topk_loss_equals_lax_top_k_definition():
    cfg = sae.default_config("topk", d_in=16, n_latents=64, k=4, aux_k=0)
    p = model.init_params(cfg, jax.random.key(0))
    p = dict(p, b_dec=jnp.linspace(-1, 1, 16), b_enc=jnp.linspace(-0.1, 0.1, 64))
    x = jax.random.normal(jax.random.key(1), (32, 16))

    def sparse(p):  # the training loss (kth_largest masking, b_dec's gradient through the zero-valued term)
        return model.losses(p, cfg, x, x, 1.0, jnp.zeros(64, bool))[0]

    def dense(p):  # the definition: keep each token's top k positive pre-activations (lax.top_k), decode densely
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        mask = jax.lax.stop_gradient((pre >= jax.lax.top_k(pre, 4)[0][:, -1:]) & (pre > 0))
        return jnp.mean(jnp.sum((x - (pre * mask) @ p["W_dec"] - p["b_dec"]) ** 2, axis=-1))

    np.testing.assert_allclose(sparse(p), dense(p), rtol=1e-6)
    gs, gd = jax.grad(sparse)(p), jax.grad(dense)(p)
    for key in gs:
        np.testing.assert_allclose(gs[key], gd[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 7, 40])  # 40 > MAX_PASSES_K: lax.top_k itself
def test_kth_largest_equals_lax_top_k(k):
    smooth = jax.random.normal(jax.random.key(0), (8, 64))
    tied = jnp.round(smooth * 2) / 2  # many exact ties: the max-and-remove passes must fall back
    for x in (smooth, tied):
        np.testing.assert_array_equal(
            jax.jit(model.kth_largest, static_argnums=1)(x, k), jax.lax.top_k(x, k)[0][:, -1:]
        )


def _auxk_case(n_dead):
    """A TopK config with aux_k=6 over 32 latents, params, inputs, residuals and `n_dead` randomly placed dead."""
    cfg = sae.default_config("topk", d_in=8, n_latents=32, k=2, aux_k=6)
    p = dict(model.init_params(cfg, jax.random.key(0)), b_dec=jnp.linspace(-1, 1, 8))
    x = jax.random.normal(jax.random.key(1), (16, 8))
    e = jax.random.normal(jax.random.key(2), (16, 8))
    return cfg, p, x, e, jax.random.permutation(jax.random.key(3), jnp.arange(32) < n_dead)


@pytest.mark.parametrize("n_dead", [3, 6, 20])  # fewer than, exactly, more than aux_k dead latents
def test_auxk_loss_matches_top_k_reference(n_dead):
    cfg, p, x, e, dead = _auxk_case(n_dead)

    def reference(p):  # the definition: top aux_k dead pre-activations by lax.top_k, no ReLU
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        vals, idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), 6)
        e_hat = jnp.einsum("bk,bko->bo", jnp.where(jnp.isfinite(vals), vals, 0.0), p["W_dec"][idx])
        return jnp.mean(jnp.sum((e - e_hat) ** 2, -1)) / jnp.mean(jnp.sum((e - e.mean(0)) ** 2, -1))

    def ours(p):
        return model.aux_k_loss(p, cfg, x, e, model.pre_activations(p, cfg, x), dead)

    np.testing.assert_allclose(ours(p), reference(p), rtol=1e-5)
    g, g_ref = jax.grad(ours)(p), jax.grad(reference)(p)
    for key in g_ref:
        np.testing.assert_allclose(g[key], g_ref[key], rtol=1e-4, atol=1e-6)


def test_rank_by_decoder_norm_is_sae_lens_rescaled_topk():
    """rank_by_decoder_norm: TopK keeps each token's k largest pre x ||d_i|| (SAELens' rescale_acts_by_decoder_norm:
    relu(topk(pre * n)) / n @ W_dec), AuxK ranks dead latents the same way; loss and gradients equal that definition."""
    cfg = sae.default_config("topk", d_in=16, n_latents=64, k=4, aux_k=5, aux_k_coeff=0.5)
    cfg.normalize_decoder, cfg.rank_by_decoder_norm = False, True
    p = model.init_params(cfg, jax.random.key(0))
    norms = jnp.exp(jax.random.normal(jax.random.key(4), (64,)))  # rows of very different norms
    p = dict(p, W_dec=p["W_dec"] * norms[:, None], b_dec=jnp.linspace(-1, 1, 16), b_enc=jnp.linspace(-0.1, 0.1, 64))
    x = jax.random.normal(jax.random.key(1), (32, 16))
    dead = jnp.arange(64) % 3 == 0  # 22 dead > aux_k: the masked (kth_largest) AuxK branch

    def ours(p):
        return model.losses(p, cfg, x, x, 1.0, dead)[0]

    def reference(p):
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        n = jnp.linalg.norm(p["W_dec"], axis=1)
        vals, idx = jax.lax.top_k(pre * n, 4)
        acts = jnp.zeros_like(pre).at[jnp.arange(32)[:, None], idx].set(jax.nn.relu(vals))
        x_hat = (acts / n) @ p["W_dec"] + p["b_dec"]
        e = jax.lax.stop_gradient(x - x_hat)
        aux_vals, aux_idx = jax.lax.top_k(jnp.where(dead, pre * n, -jnp.inf), 5)
        aux = jnp.zeros_like(pre).at[jnp.arange(32)[:, None], aux_idx].set(aux_vals)
        e_hat = (aux / n) @ p["W_dec"]
        aux_loss = jnp.mean(jnp.sum((e - e_hat) ** 2, -1)) / jnp.mean(jnp.sum((e - e.mean(0)) ** 2, -1))
        return jnp.mean(jnp.sum((x - x_hat) ** 2, -1)) + 0.5 * aux_loss

    np.testing.assert_allclose(ours(p), reference(p), rtol=1e-5)
    g, g_ref = jax.grad(ours)(p), jax.grad(reference)(p)
    for key in g_ref:
        np.testing.assert_allclose(g[key], g_ref[key], rtol=1e-4, atol=1e-5)
    plain = sae.default_config("topk", d_in=16, n_latents=64, k=4, normalize_decoder=False)
    assert not np.array_equal(sae.encode(p, plain, x) != 0, sae.encode(p, cfg, x) != 0)  # the ranking changed


def test_batchtopk_threshold_folds_with_rank_by_decoder_norm():
    cfg = sae.default_config("batchtopk", d_in=8, n_latents=16, k=3, normalize_decoder=False, rank_by_decoder_norm=True)
    p = model.init_params(cfg, jax.random.key(0))
    p = dict(p, W_dec=p["W_dec"] * jnp.linspace(0.5, 2.0, 16)[:, None], threshold=jnp.asarray(0.7))
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32) * 7
    s = 0.3
    folded = train.fold_scales(p, cfg, s, s)
    np.testing.assert_allclose(sae.encode(folded, cfg, x), sae.encode(p, cfg, x * s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_dead", [3, 20])  # fewer than aux_k dead: weighted n_dead / aux_k; more: weight 1
def test_auxk_dead_scale(n_dead):
    cfg, p, x, e, dead = _auxk_case(n_dead)
    pre = model.pre_activations(p, cfg, x)
    plain = model.aux_k_loss(p, cfg, x, e, pre, dead)
    cfg.aux_k_dead_scale = True
    scaled = model.aux_k_loss(p, cfg, x, e, pre, dead)
    np.testing.assert_allclose(scaled, min(n_dead / 6, 1.0) * plain, rtol=1e-6)
    assert float(plain) > 0
