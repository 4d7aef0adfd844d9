"""The model's reference attention (`impl="xla"`) against a naive per-head numpy softmax attention."""

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
