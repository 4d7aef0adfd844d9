"""The model's reference attention (`impl="xla"`) against a naive per-head numpy softmax attention."""

import jax
import numpy as np
import pytest

from framework.models import attention as attn


def _naive(q, k, v, mask, softcap, scale):
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, T, H, D), np.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h].astype(np.float64) @ k[b, :, h // G].astype(np.float64).T * scale
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            for t in range(T):
                if mask[b, t].any():
                    w = np.exp(s[t, mask[b, t]] - s[t, mask[b, t]].max())
                    out[b, t, h] = (w / w.sum()) @ v[b, mask[b, t], h // G]
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_xla_attention_matches_naive(heads, kv_heads, softcap):
    rng = np.random.default_rng([heads, kv_heads, int(softcap or 0)])
    B, T, S, D = 2, 7, 9, 8
    q = rng.normal(size=(B, T, heads, D)).astype(np.float32) * 2
    k = rng.normal(size=(B, S, kv_heads, D)).astype(np.float32) * 2
    v = rng.normal(size=(B, S, kv_heads, D)).astype(np.float32)
    mask = rng.random((B, T, S)) < 0.6
    mask[0, 3] = False  # a row with no visible key must come out as zeros, not NaN or an average
    out = attn.dot_product_attention(q, k, v, mask_BTS=mask, softcap=softcap, impl="xla")
    want = _naive(q, k, v, mask, softcap, D**-0.5)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)
    assert np.all(np.asarray(out)[0, 3] == 0)


def test_unknown_impl_and_bad_heads_are_named():
    q = np.zeros((1, 2, 3, 4), np.float32)
    kv = np.zeros((1, 2, 2, 4), np.float32)
    mask = np.ones((1, 2, 2), bool)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attn.dot_product_attention(q, kv, kv, mask_BTS=mask)
    with pytest.raises(ValueError, match="'nope' is not available"):
        attn.dot_product_attention(q[:, :, :2], kv, kv, mask_BTS=mask, impl="nope")
    assert "xla" in attn.available_impls()


def test_model_on_flash_kernel_matches_reference(tiny_cfg):
    """`model.attention_impl="interpret"` runs the Pallas flash kernel (interpret mode) on cache-free passes."""
    import dataclasses

    import jax.numpy as jnp

    from framework.inference import generate
    from framework.models import lm
    from framework.tasks import data

    flash_cfg = dataclasses.replace(tiny_cfg, attention_impl="interpret")
    params = jax.tree.map(lambda x: 3 * x, lm.init(tiny_cfg, jax.random.key(0)))
    batch = data.make_dataset(seed=0, batch_size=2, seq_len=48, pack=True, num_steps=(1, 2))[0]
    args = dict(positions_BT=jnp.asarray(batch["positions"]), segment_ids_BT=jnp.asarray(batch["segment_ids"]))
    tokens = jnp.asarray(batch["tokens"])

    def loss(p, cfg):
        return (lm.apply(p, tokens, cfg, **args) ** 2).mean()

    np.testing.assert_allclose(
        np.asarray(lm.apply(params, tokens, flash_cfg, **args)),
        np.asarray(lm.apply(params, tokens, tiny_cfg, **args)),
        atol=1e-5,
        rtol=0,
    )
    g_flash, g_ref = jax.grad(loss)(params, flash_cfg), jax.grad(loss)(params, tiny_cfg)
    for a, b in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=0)
    prompts = [batch["tokens"][0, :5], batch["tokens"][1, :9]]
    flash_out = generate(params, flash_cfg, prompts, max_new_tokens=6)  # decoding itself uses the cache path
    ref_out = generate(params, tiny_cfg, prompts, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(flash_out.tokens), np.asarray(ref_out.tokens))
