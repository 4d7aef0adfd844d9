"""Embedding inputs and prefix-LM masks through the model: `lm.forward(..., embeds_BTD=, prefix_len_B=)`.

Glossary: B batch, T time, D model, V vocab, P prefix length.
Row 0 has a prefix of 5 positions (it ends mid-sequence, inside the kernels' first 16-row block); row 1 has none, so
it is plain causal attention in the same batch.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.inference import kv_cache
from framework.models import lm

T = 12
PREFIX = np.array([5, 0], np.int32)
ATOL = 1e-5  # fp32 logits: the flash kernel and the cache differ from the xla pass only in summation order
GRAD_ATOL = 2e-4  # the flash kernels' fp32 gradient tolerance (tests/test_flash_attention.py)
# Every Gemma-2 feature at once: scaled embeddings, (1 + scale) norms, sandwich norms, a local layer, softcaps.
GEMMA = dict(
    scale_embeddings=True,
    norm_plus_one=True,
    post_norms=True,
    tie_embeddings=True,
    mlp_activation="gelu_tanh",
    sliding_window=3,
    sliding_window_layers=(0,),
    attn_logit_softcap=20.0,
    final_logit_softcap=15.0,
    query_pre_attn_scalar=16.0,
)


@pytest.fixture(scope="module")
def model(tiny_cfg):
    # x3 sharpens the random model so every change of input shows in the logits.
    params = jax.tree.map(lambda x: 3.0 * x, lm.init(tiny_cfg, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, T), 3, tiny_cfg.vocab_size)
    return tiny_cfg, params, tokens


def _impl(cfg, impl):
    return dataclasses.replace(cfg, attention_impl=impl)


def _halve(h):
    return 0.5 * h


@functools.partial(jax.jit, static_argnames=("cfg", "capture", "interventions"))
def _forward(params, tokens, cfg, embeds=None, prefix=None, logits_at=None, capture=(), interventions=()):
    """`lm.forward` under jit (one compile per case instead of op-by-op dispatch); (logits, captured)."""
    kw = dict(embeds_BTD=embeds, prefix_len_B=prefix, logits_at=logits_at, capture=capture)
    out = lm.forward(params, tokens, cfg, interventions=dict(interventions), **kw)
    return out.logits, out.captured


# ----------------------------------------------------------------------------------------------- embedding inputs


@pytest.mark.parametrize(
    "family,scan",
    [("llama", True), ("llama", False), ("gemma", True), pytest.param("gemma", False, marks=pytest.mark.slow)],
)
def test_embeddings_equal_to_the_lookup_give_the_token_logits(model, family, scan):
    cfg, params, tokens = model
    cfg = dataclasses.replace(cfg, scan_layers=scan, **(GEMMA if family == "gemma" else {}))
    if family == "gemma":
        params = jax.tree.map(lambda x: 3.0 * x, lm.init(cfg, jax.random.key(2)))
    x_BTD = lm.embed(params, tokens, cfg)
    if family == "gemma":  # the helper gives the scaled lookup: what the `embed` hookpoint sees
        table = np.asarray(params["embed"]["embedding"])[np.asarray(tokens)]
        np.testing.assert_allclose(np.asarray(x_BTD), table * np.float32(cfg.d_model**0.5), rtol=1e-6)
    kw = dict(capture=("embed", "blocks.1.resid_mid"), interventions=(("blocks.0.mlp_out", _halve),), prefix=PREFIX)
    ref_logits, ref_captured = _forward(params, tokens, cfg, **kw)
    logits, captured = _forward(params, None, cfg, embeds=x_BTD, **kw)
    # The inputs are bitwise the same; the two programs differ (a gather or a parameter feeds the first layer), so
    # XLA may fuse the layers' elementwise work differently: equal to fp32 rounding, not always bitwise.
    np.testing.assert_array_equal(np.asarray(ref_captured["embed"]), np.asarray(x_BTD))
    np.testing.assert_array_equal(np.asarray(captured["embed"]), np.asarray(x_BTD))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=ATOL, rtol=0)
    mid, ref_mid = (np.asarray(c["blocks.1.resid_mid"]) for c in (captured, ref_captured))
    np.testing.assert_allclose(mid, ref_mid, atol=ATOL, rtol=0)
    if family == "gemma":
        return
    at = jnp.asarray([[T - 1], [3]])  # logits at chosen positions only
    np.testing.assert_allclose(
        np.asarray(_forward(params, None, cfg, embeds=x_BTD, logits_at=at)[0]),
        np.asarray(_forward(params, tokens, cfg, logits_at=at)[0]),
        atol=ATOL,
        rtol=0,
    )


def test_soft_embeddings_are_used(model):
    """A row built from mixed embeddings (an image-token stand-in) runs and changes only what it should see."""
    cfg, params, tokens = model
    x_BTD = lm.embed(params, tokens, cfg)
    soft = x_BTD.at[:, 2].set(jax.random.normal(jax.random.key(3), (2, cfg.d_model)))
    a, b = (_forward(params, None, cfg, embeds=e)[0] for e in (x_BTD, soft))
    diff_BT = np.abs(np.asarray(a - b)).max(-1)
    assert (diff_BT[:, :2] == 0).all() and (diff_BT[:, 2:] > 1e-4).all()


# -------------------------------------------------------------------------------------------- prefix-LM masks


def _changed(cfg, params, tokens, pos: int, **kw):
    """Max-abs change of every position's logits [B, T] when the token at `pos` changes."""
    other = tokens.at[:, pos].set(3 + (tokens[:, pos] - 3 + 1) % (cfg.vocab_size - 3))
    a, b = (_forward(params, t, cfg, prefix=PREFIX, **kw)[0] for t in (tokens, other))
    return np.abs(np.asarray(a - b)).max(-1)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_prefix_is_bidirectional_and_the_rest_causal(model, impl):
    cfg, params, tokens = model
    cfg = _impl(cfg, impl)
    inside = _changed(cfg, params, tokens, 3)  # inside row 0's prefix
    assert (inside[0] > 1e-4).all()  # every position sees it, the prefix's earlier ones too
    assert (inside[1, :3] == 0).all() and (inside[1, 3:] > 1e-4).all()  # row 1 (no prefix) is causal
    after = _changed(cfg, params, tokens, 8)  # after the prefix: earlier positions never change, exactly
    assert (after[:, :8] == 0).all() and (after[:, 8:] > 1e-4).all()
    at_edge = _changed(cfg, params, tokens, 5)  # the first position past the prefix is not part of it
    assert (at_edge[:, :5] == 0).all()


def test_prefix_flash_equals_xla_with_windows_and_softcaps(model):
    cfg, _, tokens = model
    cfg = dataclasses.replace(cfg, **GEMMA)
    params = jax.tree.map(lambda x: 3.0 * x, lm.init(cfg, jax.random.key(2)))
    for prefix in (PREFIX, np.array([T, 9], np.int32)):  # the whole row, and a prefix longer than the window
        ref = _forward(params, tokens, cfg, prefix=prefix)[0]
        flash = _forward(params, tokens, _impl(cfg, "interpret"), prefix=prefix)[0]
        unstacked = _forward(lm.unstack_layers(params, cfg), tokens, cfg, prefix=prefix)[0]
        np.testing.assert_allclose(np.asarray(flash), np.asarray(ref), atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(unstacked), np.asarray(ref), atol=ATOL, rtol=0)
    # A prefix of 0 is causal attention; a prefix of T differs from it.
    causal = np.asarray(_forward(params, tokens, cfg)[0])
    np.testing.assert_array_equal(np.asarray(_forward(params, tokens, cfg, prefix=np.zeros(2, np.int32))[0]), causal)
    assert not np.allclose(np.asarray(_forward(params, tokens, cfg, prefix=np.full(2, T, np.int32))[0]), causal)


@functools.partial(jax.jit, static_argnames=("cfg", "ts"))
def _embedding_grads(params, tokens, cfg, ts):
    """Per query position t in `ts`: d (logits[:, t] . w) / d x, [B, S, D] (x: the input embeddings)."""
    x_BTD = lm.embed(params, tokens, cfg)
    logits, vjp = jax.vjp(lambda x: lm.apply(params, None, cfg, embeds_BTD=x, prefix_len_B=PREFIX), x_BTD)
    w_V = jax.random.normal(jax.random.key(4), (cfg.vocab_size,))
    return {t: vjp(jnp.zeros_like(logits).at[:, t].set(w_V))[0] for t in ts}


def test_prefix_gradients_follow_the_mask(model):
    """d logits[t] / d x[s] is nonzero exactly where t sees s (through the layers): s <= t, or both in the prefix."""
    cfg, params, tokens = model
    ts = (1, 4, 7)  # inside the prefix, its last position, after it
    grads = {impl: _embedding_grads(params, tokens, _impl(cfg, impl), ts) for impl in ("xla", "interpret")}
    grads = jax.tree.map(np.asarray, grads)
    for t in ts:
        np.testing.assert_allclose(grads["interpret"][t], grads["xla"][t], atol=GRAD_ATOL, rtol=0)
        for impl in grads:
            norm_BS = np.abs(grads[impl][t]).sum(-1)
            for b, P in enumerate(PREFIX):
                seen = np.asarray([s <= t or (t < P and s < P) for s in range(T)])
                assert (norm_BS[b, seen] > 0).all(), (impl, t, b, norm_BS[b])
                assert (norm_BS[b, ~seen] == 0).all(), (impl, t, b, norm_BS[b])


def test_prefix_parameter_gradients_flash_equal_xla(model):
    cfg, params, tokens = model

    def loss(p, c):
        return (lm.apply(p, tokens, c, prefix_len_B=PREFIX) ** 2).mean()

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref, g_flash = (grad(params, _impl(cfg, impl)) for impl in ("xla", "interpret"))
    for a, b in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=GRAD_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- KV cache


def _cache(cfg, layout):
    cache = kv_cache.init_cache(cfg, 2, 16, layout=layout, page_size=4)
    if layout == "paged":
        pool, pages, ok = kv_cache.allocate(cache.pool, jnp.asarray([4, 4]), 4)
        assert bool(ok)
        cache = cache.replace(page_table=pages, pool=pool)
    return cache


@functools.partial(jax.jit, static_argnames="cfg")
def _prefill_and_step(params, tokens, cache, cfg):
    """Prefill of T - 1 embedded tokens under the prefix, then one decode step without and with the prefix."""
    x_BTD = lm.embed(params, tokens, cfg)
    out = lm.forward(params, None, cfg, embeds_BTD=x_BTD[:, : T - 1], prefix_len_B=PREFIX, kv_cache=cache)
    pos, last = jnp.full((2, 1), T - 1), tokens[:, T - 1 :]
    step = lm.forward(params, last, cfg, positions_BT=pos, kv_cache=out.kv_cache).logits
    same = lm.forward(params, last, cfg, positions_BT=pos, kv_cache=out.kv_cache, prefix_len_B=PREFIX).logits
    return out.logits, step, same


@pytest.mark.parametrize("layout", kv_cache.LAYOUTS)
@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_kv_cache_prefill_with_prefix_equals_the_cache_free_pass(model, layout, impl):
    cfg, params, tokens = model
    cfg = _impl(cfg, impl)
    ref = np.asarray(_forward(params, tokens, cfg, prefix=PREFIX)[0])
    prefill, step, same = _prefill_and_step(params, tokens, _cache(cfg, layout), cfg)
    np.testing.assert_allclose(np.asarray(prefill), ref[:, : T - 1], atol=ATOL, rtol=0)
    # A decode step after the prefix needs no prefix term: it already sees every earlier key; passing one is a no-op.
    np.testing.assert_allclose(np.asarray(step[:, 0]), ref[:, T - 1], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(step))


# ------------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_are_named(model):
    cfg, params, tokens = model
    x_BTD = lm.embed(params, tokens, cfg)
    for args, kw, match in [
        ((tokens,), dict(embeds_BTD=x_BTD), "pass tokens_BT=None"),
        ((None,), {}, "both are None"),
        ((None,), dict(embeds_BTD=x_BTD[..., :8]), r"embeds_BTD must be \[B, T, D=32\]"),
        ((None,), dict(embeds_BTD=tokens[..., None]), r"embeds_BTD must be \[B, T, D=32\]"),
        ((tokens,), dict(prefix_len_B=np.array([3])), r"prefix_len_B must be integers of shape \[B=2\]"),
        ((tokens,), dict(prefix_len_B=np.array([3.0, 1.0])), r"prefix_len_B must be integers"),
        ((tokens,), dict(prefix_len_B=PREFIX, segment_ids_BT=jnp.zeros_like(tokens)), "segment_ids_BT"),
    ]:
        with pytest.raises(ValueError, match=match):
            lm.forward(params, *args, cfg, **kw)
