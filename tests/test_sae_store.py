"""Activation store: one forward pass harvests several hookpoints; shuffled aligned batches; fit from a store."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import sae
from framework.models import lm
from framework.sae import store as store_lib
from framework.tasks import tokenizer as tok

HOOKS = ("blocks.0.resid_post", "blocks.1.mlp_out")


@pytest.fixture(scope="module")
def harvested(tiny_cfg, tmp_path_factory):
    params = lm.init(tiny_cfg, jax.random.key(0))
    r = np.random.default_rng(0)
    batches = []
    for _ in range(6):
        t = r.integers(3, 24, size=(8, 24)).astype(np.int32)
        t[:, 0] = tok.BOS_ID
        t[:, 20:] = tok.PAD_ID
        batches.append({"tokens": t})
    path = str(tmp_path_factory.mktemp("store"))
    st = store_lib.harvest(params, tiny_cfg, HOOKS, iter(batches), path, max_tokens=700)
    return params, batches, st


def test_harvest_matches_forward_capture(tiny_cfg, harvested):
    params, batches, st = harvested
    assert st.num_tokens == 700 and st.hookpoints == HOOKS  # 6 * 8 * 19 = 912 non-pad, non-BOS: capped at 700
    reopened = sae.ActivationStore.open(st.path)
    idx = reopened.token_index
    ctx = reopened.contexts
    assert ctx.shape == (40, 24)  # 5 batches of 8 rows hold 760 >= 700 tokens: the sixth is never run
    for h in HOOKS:
        cap = lm.forward(params, jnp.asarray(ctx), tiny_cfg, capture=(h,)).captured[h]
        expect = np.asarray(cap)[idx[:, 0], idx[:, 1]]
        np.testing.assert_allclose(reopened.array(h), expect, rtol=1e-5, atol=1e-5)
    assert not np.any(np.isin(ctx[idx[:, 0], idx[:, 1]], [tok.PAD_ID, tok.BOS_ID]))


def test_batches_shuffle_and_stay_aligned(harvested):
    _, _, st = harvested
    a, b = st.array(HOOKS[0]), st.array(HOOKS[1])
    it = st.batches(list(HOOKS), batch_size=50, seed=0, buffer_rows=300, chunk_rows=100)
    seen = []
    for _ in range(28):  # two passes' worth of rows
        batch = next(it)
        rows = [int(np.flatnonzero(np.all(a == r, axis=1))[0]) for r in batch[HOOKS[0]]]
        np.testing.assert_array_equal(batch[HOOKS[1]], b[rows])  # the same tokens in both hookpoints
        seen += rows
    assert rows != sorted(rows)  # shuffled
    assert len(set(seen)) > 0.95 * st.num_tokens  # a buffer delays rows, it drops none


def test_fit_from_store_and_errors(harvested, tiny_cfg):
    _, _, st = harvested
    cfg = sae.default_config("topk", d_in=tiny_cfg.d_model, n_latents=64, k=4, hookpoint=HOOKS[1], steps_per_call=10)
    params, metrics = sae.fit(st, cfg, steps=20, batch_size=64, seed=0)
    assert params["W_dec"].shape == (64, tiny_cfg.d_model) and len(metrics["history"]) == 1
    tc = sae.default_config("topk", d_in=32, n_latents=64, k=4, hookpoint=HOOKS[0], out_hookpoint=HOOKS[1], d_out=32)
    tparams, _ = sae.fit(st, tc, steps=10, batch_size=64, seed=0)
    assert tparams["W_enc"].shape == (32, 64)
    bad = sae.default_config("topk", d_in=32, n_latents=64, k=4, hookpoint="blocks.1.attn_out")
    with pytest.raises(ValueError, match=r"sae.hookpoint = 'blocks.1.attn_out' is not in the store"):
        sae.fit(st, bad, steps=2, batch_size=8)
    wide = sae.default_config("topk", d_in=48, n_latents=64, k=4, hookpoint=HOOKS[0])
    with pytest.raises(ValueError, match=r"has width 32 but sae.d_in = 48"):
        sae.fit(st, wide, steps=2, batch_size=8)


def test_harvest_rejects_unknown_hookpoint(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"unknown hookpoint 'blocks.2.resid_post'; expected"):
        store_lib.harvest({}, tiny_cfg, ["blocks.2.resid_post"], iter([]), str(tmp_path), max_tokens=10)
