"""The decoder LM (framework.models.lm): shapes, causality, GQA, scan/remat variants, KV cache, hooks, axes, FLOPs.

Every model here is tiny (2 layers, d_model 32) and every forward is jitted with the config static, so each
distinct (config, shape) compiles once per session.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from framework.inference import kv_cache
from framework.models import hf_families, lm

ATOL = 1e-5  # fp32 paths that differ only in summation order / program structure


@functools.partial(jax.jit, static_argnames=("cfg", "capture", "interventions"))
def _forward(params, tokens_BT, cfg, capture=(), interventions=()):
    # interventions as a tuple of (name, fn) pairs: hashable, so usable as a static argument.
    return lm.forward(params, tokens_BT, cfg, capture=capture, interventions=dict(interventions))


@functools.partial(jax.jit, static_argnames="cfg")
def _cached_forward(params, tokens_BT, positions_BT, cache, cfg):
    return lm.forward(params, tokens_BT, cfg, positions_BT=positions_BT, kv_cache=cache)


@pytest.fixture(scope="module")
def model(tiny_cfg):
    # x3 sharpens the random model so logits differ visibly between tokens (a real signal to compare).
    params = jax.tree.map(lambda x: 3.0 * x, lm.init(tiny_cfg, jax.random.key(0)))
    return tiny_cfg, params


def _tokens(cfg, B=2, T=12, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, size=(B, T)), jnp.int32)


def _max_diff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


# ----------------------------------------------------------------------------------------------------- shapes


def test_output_shapes_and_dtypes(model):
    cfg, params = model
    tokens = _tokens(cfg, B=3, T=7)
    out = _forward(params, tokens, cfg)
    assert out.logits.shape == (3, 7, cfg.vocab_size) and out.logits.dtype == jnp.float32
    assert out.kv_cache is None and out.captured == {}
    assert np.all(np.isfinite(out.logits))
    # Eager and jitted programs fuse differently: equal up to fp32 rounding.
    np.testing.assert_allclose(lm.apply(params, tokens, cfg), out.logits, atol=1e-6, rtol=0)
    # The params tree: stacked layers under "layers", each leaf with the layer count leading.
    assert set(params) == {"embed", "layers", "final_norm", "lm_head"}
    assert params["embed"]["embedding"].shape == (cfg.vocab_size, cfg.d_model)
    L, D, H, K, Dh, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attn = params["layers"]["attn"]
    assert attn["q_proj"]["kernel"].shape == (L, D, H, Dh)
    assert attn["k_proj"]["kernel"].shape == (L, D, K, Dh)
    assert attn["v_proj"]["kernel"].shape == (L, D, K, Dh)
    assert attn["o_proj"]["kernel"].shape == (L, H, Dh, D)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (L, F, D)
    assert params["layers"]["attn_norm"]["scale"].shape == (L, D)
    assert params["lm_head"]["kernel"].shape == (D, cfg.vocab_size)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert lm.param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))
    assert lm.param_count(cfg, include_embedding=False) == lm.param_count(cfg) - cfg.vocab_size * D


def test_init_is_deterministic_in_the_key(tiny_cfg):
    a, b, c = (lm.init(tiny_cfg, jax.random.key(s)) for s in (0, 0, 1))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["layers"]["attn"]["q_proj"]["kernel"], c["layers"]["attn"]["q_proj"]["kernel"])
    # Layers get different initial weights (split rngs over the scan).
    q = a["layers"]["attn"]["q_proj"]["kernel"]
    assert not np.array_equal(q[0], q[1])


# -------------------------------------------------------------------------------------------------- causality


def test_causality_future_tokens_never_change_past_logits(model):
    cfg, params = model
    T = 12
    tokens = _tokens(cfg, B=2, T=T)
    base = _forward(params, tokens, cfg).logits
    for t in (0, 5, T - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % cfg.vocab_size)
        logits = _forward(params, changed, cfg).logits
        np.testing.assert_allclose(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert _max_diff(logits[:, t], base[:, t]) > 1e-3, "the changed token must change its own logits"


# ---------------------------------------------------------------------------------------------------- variants


def test_gqa_equals_mha_with_repeated_kv_heads(model):
    cfg, params = model
    G = cfg.n_heads // cfg.n_kv_heads
    assert G > 1
    mha_cfg = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
    # Query head h reads kv head h // G, so repeating each kv head G times (kv-head axis 2 of [L, D, K, Dh]) gives
    # MHA with the same function.
    mha = jax.tree.map(lambda x: x, params)
    for name in ("k_proj", "v_proj"):
        mha["layers"]["attn"][name] = {"kernel": jnp.repeat(params["layers"]["attn"][name]["kernel"], G, axis=2)}
    tokens = _tokens(cfg)
    np.testing.assert_allclose(
        _forward(mha, tokens, mha_cfg).logits, _forward(params, tokens, cfg).logits, atol=ATOL, rtol=0
    )


def test_unrolled_layers_equal_scanned(model):
    cfg, params = model
    tokens = _tokens(cfg)
    unrolled = _forward(params, tokens, dataclasses.replace(cfg, scan_layers=False)).logits
    np.testing.assert_allclose(unrolled, _forward(params, tokens, cfg).logits, atol=ATOL, rtol=0)


@functools.partial(jax.jit, static_argnames="cfg")
def _loss_and_grad(params, tokens_BT, cfg):
    def loss(p):
        logp = jax.nn.log_softmax(lm.apply(p, tokens_BT, cfg)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1))

    return jax.value_and_grad(loss)(params)


def test_remat_policies_give_the_same_loss_and_gradients(model):
    cfg, params = model
    tokens = _tokens(cfg)
    loss, grads = _loss_and_grad(params, tokens, cfg)
    for remat in ("full", "dots"):
        loss_r, grads_r = _loss_and_grad(params, tokens, dataclasses.replace(cfg, remat=remat))
        np.testing.assert_allclose(loss_r, loss, atol=ATOL, rtol=0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=0), grads_r, grads)
    assert float(optax_norm(grads)) > 1e-3, "gradients must be non-trivial for the comparison to mean something"


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------------- KV cache


def test_kv_cache_prefill_then_one_token_at_a_time_equals_full_forward(model):
    cfg, params = model
    B, T, prefix = 2, 12, 5
    tokens = _tokens(cfg, B=B, T=T, seed=1)
    full = _forward(params, tokens, cfg).logits
    cache = kv_cache.init_cache(cfg, B, 16)
    # The reference attention reads a heads-major cache; the decode kernels read a token-major one.
    assert cache.layers.heads_major
    assert cache.layers.k.shape == (cfg.n_layers, B, cfg.n_kv_heads, 16, cfg.head_dim)
    kernel_cache = kv_cache.init_cache(dataclasses.replace(cfg, attention_impl="interpret"), B, 16)
    assert kernel_cache.layers.k.shape == (cfg.n_layers, B, 16, cfg.n_kv_heads, cfg.head_dim)
    pos = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (B, prefix))
    out = _cached_forward(params, tokens[:, :prefix], pos, cache, cfg)
    np.testing.assert_allclose(out.logits, full[:, :prefix], atol=ATOL, rtol=0)
    cache = out.kv_cache
    for t in range(prefix, T):
        out = _cached_forward(params, tokens[:, t : t + 1], jnp.full((B, 1), t, jnp.int32), cache, cfg)
        cache = out.kv_cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=ATOL, rtol=0, err_msg=f"position {t}")


def test_logits_at_computes_the_output_layer_at_chosen_positions_only(model):
    cfg, params = model
    tokens = _tokens(cfg, B=3, T=10, seed=2)
    full = _forward(params, tokens, cfg).logits
    at_BN = jnp.asarray([[9, 0], [4, 4], [0, 7]], jnp.int32)
    some = jax.jit(lambda p, t, a: lm.apply(p, t, cfg, logits_at=a))(params, tokens, at_BN)
    assert some.shape == (3, 2, cfg.vocab_size)
    # The output matmul runs on 6 rows instead of 30: equal up to the backend's fp32 rounding for that row count.
    np.testing.assert_allclose(some, jnp.take_along_axis(full, at_BN[:, :, None], axis=1), atol=1e-5, rtol=0)
    # With a KV cache (generate's prefill): the chunk is cached in full, logits come back only where asked.
    cache = kv_cache.init_cache(cfg, 3, 16)
    pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (3, 10))
    out = lm.forward(params, tokens, cfg, positions_BT=pos, kv_cache=cache, logits_at=at_BN[:, :1])
    ref = lm.forward(params, tokens, cfg, positions_BT=pos, kv_cache=cache)
    assert out.logits.shape == (3, 1, cfg.vocab_size)
    np.testing.assert_array_equal(out.kv_cache.layers.k, ref.kv_cache.layers.k)
    np.testing.assert_allclose(out.logits[:, 0], full[jnp.arange(3), at_BN[:, 0]], atol=1e-5, rtol=0)


def test_kv_cache_with_right_padded_ragged_batch(model):
    """Rows of different lengths, right-padded: each row's logits equal its own unpadded forward, and decoding
    continues every row at its own position (overwriting the pad slots before they become visible)."""
    cfg, params = model
    lens, T, n_new, S = (3, 8), 8, 4, 16
    seqs = [np.asarray(_tokens(cfg, B=1, T=n + n_new, seed=10 + n)[0]) for n in lens]
    B = len(lens)
    padded = np.full((B, T), cfg.pad_id, np.int32)
    for b, n in enumerate(lens):
        padded[b, :n] = seqs[b][:n]
    out = _cached_forward(
        params,
        jnp.asarray(padded),
        jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
        kv_cache.init_cache(cfg, B, S),
        cfg,
    )
    refs = [_forward(params, jnp.asarray(s[None]), cfg).logits[0] for s in seqs]
    for b, n in enumerate(lens):
        np.testing.assert_allclose(out.logits[b, :n], refs[b][:n], atol=ATOL, rtol=0)
    cache, lens_B = out.kv_cache, np.asarray(lens)
    for i in range(n_new):
        pos_B = lens_B + i
        tok_B = np.array([seqs[b][pos_B[b]] for b in range(B)], np.int32)
        out = _cached_forward(params, jnp.asarray(tok_B[:, None]), jnp.asarray(pos_B[:, None]), cache, cfg)
        cache = out.kv_cache
        for b in range(B):
            np.testing.assert_allclose(
                out.logits[b, 0], refs[b][pos_B[b]], atol=ATOL, rtol=0, err_msg=f"row {b} position {pos_B[b]}"
            )


# ---------------------------------------------------------------------------------------------------- hookpoints


def test_capture_shapes_chaining_and_no_effect_on_logits(model):
    cfg, params = model
    tokens = _tokens(cfg, B=2, T=9)
    names = tuple(lm.hookpoints(cfg))
    assert names[0] == "embed" and names[-1] == "final_norm" and len(names) == 2 + 5 * cfg.n_layers
    out = _forward(params, tokens, cfg, capture=names)
    assert set(out.captured) == set(names)
    for name, x in out.captured.items():
        assert x.shape == (2, 9, cfg.d_model) and x.dtype == jnp.float32, name
    np.testing.assert_array_equal(out.logits, _forward(params, tokens, cfg).logits)
    c = out.captured
    np.testing.assert_array_equal(c["blocks.0.resid_pre"], c["embed"])
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}."
        np.testing.assert_allclose(c[b + "resid_mid"], c[b + "resid_pre"] + c[b + "attn_out"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(c[b + "resid_post"], c[b + "resid_mid"] + c[b + "mlp_out"], atol=1e-6, rtol=0)
        if layer + 1 < cfg.n_layers:
            np.testing.assert_array_equal(c[b + "resid_post"], c[f"blocks.{layer + 1}.resid_pre"])
    # Layers differ: capture picks each layer's own activation, not one broadcast value.
    assert _max_diff(c["blocks.0.attn_out"], c["blocks.1.attn_out"]) > 1e-3
    # The embedding hookpoint is the embedding row of each token.
    np.testing.assert_array_equal(c["embed"], params["embed"]["embedding"][tokens])


def _zeros(x):
    return jnp.zeros_like(x)


def _identity(x):
    return x


def test_identity_intervention_leaves_logits_unchanged(model):
    cfg, params = model
    tokens = _tokens(cfg)
    base = _forward(params, tokens, cfg).logits
    names = ("embed", "blocks.0.resid_post", "blocks.1.attn_out", "blocks.1.mlp_out", "final_norm")
    out = _forward(params, tokens, cfg, interventions=tuple((name, _identity) for name in names))
    np.testing.assert_allclose(out.logits, base, atol=1e-6, rtol=0)


def test_zeroing_an_intervention_changes_logits_and_is_what_capture_sees(model):
    cfg, params = model
    tokens = _tokens(cfg)
    base = _forward(params, tokens, cfg, capture=("blocks.0.resid_post", "blocks.1.resid_post"))
    out = _forward(
        params,
        tokens,
        cfg,
        capture=("blocks.0.resid_post", "blocks.1.resid_pre", "blocks.1.resid_post"),
        interventions=(("blocks.0.resid_post", _zeros),),
    )
    assert _max_diff(out.logits, base.logits) > 1e-2
    # Captures are taken after the intervention, and the next layer reads the replaced value.
    np.testing.assert_array_equal(out.captured["blocks.0.resid_post"], 0.0)
    np.testing.assert_array_equal(out.captured["blocks.1.resid_pre"], 0.0)
    # The model is bias-free, so a zero residual stays zero through layer 1 (RMSNorm(0) = 0, attention and MLP of
    # 0 are 0) and the logits are exactly 0: the replaced value really is what the rest of the model sees.
    np.testing.assert_array_equal(out.captured["blocks.1.resid_post"], 0.0)
    np.testing.assert_array_equal(out.logits, 0.0)
    assert _max_diff(base.captured["blocks.1.resid_post"], 0.0) > 1e-3


def test_intervention_applies_only_at_the_named_layer(model):
    cfg, params = model
    tokens = _tokens(cfg)
    names = ("blocks.0.mlp_out", "blocks.1.mlp_out", "blocks.1.resid_pre")
    base = _forward(params, tokens, cfg, capture=names)
    out = _forward(params, tokens, cfg, capture=names, interventions=(("blocks.1.mlp_out", _zeros),))
    # Layer 0 is untouched (same mlp_out, same layer-1 input); only layer 1's mlp_out is zeroed.
    np.testing.assert_array_equal(out.captured["blocks.0.mlp_out"], base.captured["blocks.0.mlp_out"])
    np.testing.assert_array_equal(out.captured["blocks.1.resid_pre"], base.captured["blocks.1.resid_pre"])
    np.testing.assert_array_equal(out.captured["blocks.1.mlp_out"], 0.0)
    assert _max_diff(base.captured["blocks.1.mlp_out"], 0.0) > 1e-3
    assert _max_diff(out.logits, base.logits) > 1e-3


@pytest.mark.parametrize(
    "name", ["blocks.2.resid_post", "blocks.0.resid", "block.0.resid_post", "logits", "blocks.x.attn_out"]
)
def test_unknown_hookpoint_is_a_value_error_naming_it(model, name):
    cfg, params = model
    tokens = _tokens(cfg, B=1, T=3)
    with pytest.raises(ValueError, match=f"unknown hookpoint '{name}'"):
        lm.forward(params, tokens, cfg, capture=(name,))
    with pytest.raises(ValueError, match=f"unknown hookpoint '{name}'"):
        lm.forward(params, tokens, cfg, interventions={name: _identity})


# ----------------------------------------------------------------------------------------------- sharding axes


def test_logical_axes_mirror_the_params_tree(model):
    cfg, params = model
    axes = lm.logical_axes(cfg)
    is_spec = lambda s: isinstance(s, P)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_spec) == jax.tree.structure(params)
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_spec)[0])
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    known = {"layers", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab"}
    for path, spec in flat_axes.items():
        x = flat_params[path]
        name = jax.tree_util.keystr(path)
        assert len(spec) == x.ndim and all(a in known for a in spec), (name, spec, x.shape)
        assert (spec[0] == "layers") == (path[0].key == "layers"), (name, spec)
    attn = axes["layers"]["attn"]
    assert attn["q_proj"]["kernel"] == P("layers", "embed", "heads", "head_dim")
    assert attn["k_proj"]["kernel"] == P("layers", "embed", "kv_heads", "head_dim")
    assert attn["o_proj"]["kernel"] == P("layers", "heads", "head_dim", "embed")
    assert axes["layers"]["mlp"]["gate_proj"]["kernel"] == P("layers", "embed", "mlp")
    assert axes["layers"]["mlp"]["down_proj"]["kernel"] == P("layers", "mlp", "embed")
    assert axes["layers"]["attn_norm"]["scale"] == P("layers", "embed")
    assert axes["embed"]["embedding"] == P("vocab", "embed")
    assert axes["final_norm"]["scale"] == P("embed")
    assert axes["lm_head"]["kernel"] == P("embed", "vocab")


# ------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(n_heads=6, n_kv_heads=4), r"model\.n_heads \(6\) must be divisible by model\.n_kv_heads \(4\)"),
        (dict(d_model=0), r"model\.d_model must be positive"),
        (dict(head_dim=7), r"model\.head_dim must be even"),
        (dict(remat="some"), r"model\.remat must be one of"),
        (dict(dtype="float8"), r"model\.dtype must be one of"),
        (dict(param_dtype="int8"), r"model\.param_dtype must be one of"),
        (dict(attention_impl="flash"), r"model\.attention_impl 'flash'"),
        (dict(pad_id=24), r"special token ids \[24\] are outside \[0, model\.vocab_size=24\)"),
        (dict(short_conv=1), r"model\.short_conv must be 0 \(none\) or an int >= 2"),
        (dict(short_conv=-2), r"model\.short_conv must be 0"),
        (dict(short_conv=True), r"model\.short_conv must be 0"),
    ],
)
def test_lmconfig_validation_names_the_field(tiny_cfg, changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(tiny_cfg, **changes)


def test_lmconfig_from_config_rejects_unknown_keys(tiny_cfg):
    d = tiny_cfg.to_dict()
    assert lm.LMConfig.from_config(d) == tiny_cfg
    with pytest.raises(ValueError, match=r"unknown model config keys \['n_layer'\]"):
        lm.LMConfig.from_config({**d, "n_layer": 3})
    hash(tiny_cfg)  # usable as a static jit argument


def test_tied_embeddings_have_no_lm_head(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, tie_embeddings=True)
    params = lm.init(cfg, jax.random.key(0))
    assert "lm_head" not in params and "lm_head" not in lm.logical_axes(cfg)
    assert lm.param_count(cfg) == lm.param_count(tiny_cfg) - cfg.d_model * cfg.vocab_size
    tokens = _tokens(cfg, B=1, T=5)
    out = _forward(params, tokens, cfg, capture=("final_norm",))
    # The output layer is the embedding table itself.
    expected = jnp.einsum("btd,vd->btv", out.captured["final_norm"], params["embed"]["embedding"])
    np.testing.assert_allclose(out.logits, expected, atol=ATOL, rtol=0)


def test_flops_per_token_matches_a_hand_count():
    cfg = lm.LMConfig(vocab_size=10, d_model=4, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=2, d_ff=5)
    T = 7
    q, k, v, o = 4 * 2 * 2, 4 * 1 * 2, 4 * 1 * 2, 2 * 2 * 4  # 16 + 8 + 8 + 16 = 48
    mlp = 3 * 4 * 5  # gate, up, down: 60
    n_matmul = 3 * (q + k + v + o + mlp) + 4 * 10  # 3 * 108 + 40 = 364 (the embedding gather is free)
    attn = 3 * 2 * 2 * (2 * T * 2)  # per layer and head: QK^T and PV, each 2·T·Dh FLOPs per query: 336
    assert lm.flops_per_token(cfg, T, training=False) == 2 * n_matmul + attn == 1064
    assert lm.flops_per_token(cfg, T) == 3 * 1064
    # Matmul parameters are exactly the non-embedding, non-norm parameters.
    norms = 3 * 2 * 4 + 4
    assert lm.param_count(cfg, include_embedding=False) - norms == n_matmul


def test_inference_flops_match_a_hand_count():
    """`lm.flops`: 2·N per token of prompt + new tokens, 4·H·Dh per (query, visible key) pair per layer."""
    cfg = lm.LMConfig(vocab_size=10, d_model=4, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=2, d_ff=5)
    n_matmul, pair = 364, 4 * 2 * 2  # N as in the hand count above; q·k + p·v for H=2 heads of Dh=2: 16 per pair
    # A prefill of 5 tokens and 3 decoded ones: 8 tokens, the token at position t sees t + 1 keys: 36 pairs a layer.
    assert lm.flops(cfg, 5, 3) == 2 * n_matmul * 8 + 3 * 36 * pair == 7552.0
    assert lm.flops(cfg, 8, 0) == lm.flops(cfg, 0, 8) == lm.flops(cfg, 5, 3)  # scoring a text costs as writing it
    # A sliding window of 3 on layer 0 caps each query's keys: 1 + 2 + 3 + 3 + 3 + 3 + 3 + 3 = 21 pairs there.
    local = dataclasses.replace(cfg, sliding_window=3, sliding_window_layers=(0,))
    assert lm.flops(local, 5, 3) == 2 * n_matmul * 8 + (21 + 36 + 36) * pair
    # Per-row arrays (broadcast), and nothing to do costs nothing.
    rows = lm.flops(cfg, np.array([5, 0, 1]), np.array([3, 8, 1]))
    np.testing.assert_array_equal(rows, [7552.0, 7552.0, 2 * n_matmul * 2 + 3 * 3 * pair])
    assert rows.dtype == np.float64 and lm.flops(cfg, 0, 0) == 0.0
    for bad in (-1, 2.5, True, "5"):
        with pytest.raises(ValueError, match="prompt_tokens"):
            lm.flops(cfg, bad, 3)


def test_search_flops_go_through_lm_flops(tiny_cfg):
    """`SearchResults.flops` prices every recorded policy call and verifier pass with `lm.flops`."""
    from framework import search
    from framework.search import toy
    from framework.tasks import arithmetic

    problems = arithmetic.sample_problems(3, 1, num_steps=(2, 3), modulus=100)
    verifier_cfg = dataclasses.replace(tiny_cfg, n_layers=1)
    # Greedy with a perfect toy policy: one call per problem, nothing prefilled, the gold solution written.
    greedy = search.run("greedy", toy.ToyPolicy(1.0), None, problems, n=1)
    for p, per in zip(problems, greedy.flops_per_problem(tiny_cfg)):
        assert per == lm.flops(tiny_cfg, 0, len(arithmetic.format_solution(p)))
    # Beam search: one row per candidate per depth, each a prefill of its prefix plus a line, and verifier passes.
    res = search.run("beam", toy.ToyPolicy(0.5, branching=3), toy.OracleScorer(), problems, n=4, m=2, seed=0)
    expected = np.zeros(len(problems))
    for pids, prompt, new in res.policy_calls:
        for p, a, b in zip(pids, prompt, new):
            expected[p] += lm.flops(tiny_cfg, int(a), int(b))
    for pids, tokens in res.scorer_calls:
        for p, a in zip(pids, tokens):
            expected[p] += lm.flops(verifier_cfg, int(a), 0)
    assert len(res.policy_calls) > 2 and expected.min() > 0
    np.testing.assert_allclose(res.flops_per_problem(tiny_cfg, verifier_cfg), expected, rtol=1e-12)
    holder = type("Handle", (), {"cfg": tiny_cfg})()  # LMPolicy and Verifier carry their config as .cfg
    assert res.flops(holder) == res.flops(tiny_cfg.to_dict()) == float(res.flops_per_problem(tiny_cfg).sum())
    # One convention: a bare parameter count (the old 2·N-per-token figure) or a name is no longer a cost model.
    for bad in (1000, "tiny"):
        with pytest.raises(ValueError, match="policy must be a model config"):
            res.flops(bad)


# ------------------------------------------------------------------------------------------------ numerics


def test_bfloat16_runs_and_is_close_to_float32(model):
    cfg, params = model
    tokens = _tokens(cfg, B=2, T=12)
    ref = _forward(params, tokens, cfg).logits
    out = _forward(params, tokens, dataclasses.replace(cfg, dtype="bfloat16"))
    assert out.logits.dtype == jnp.float32 and np.all(np.isfinite(out.logits))
    # bf16 keeps 8 significant bits (relative spacing 2^-8 ≈ 0.4%); the residual stream and every activation are
    # rounded to it, so logits reaching |3| here move by ~1e-2 (measured: 0.016, spread 0.95). The bound, 3% of
    # the logits' spread, leaves ~2x headroom for other rounding orders, while a real bug (a wrong cast, a dropped
    # term: zeroing one layer's MLP moves them by 0.2) lands far outside it.
    spread = float(jnp.std(ref))
    assert spread > 0.3
    assert _max_diff(out.logits, ref) <= 0.03 * spread
    # bf16 params too (param_dtype): same closeness, params stored in bf16.
    bf_cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert (
        jax.eval_shape(functools.partial(lm.init, bf_cfg), jax.random.key(0))["lm_head"]["kernel"].dtype == jnp.bfloat16
    )
    assert _max_diff(_forward(bf_params, tokens, bf_cfg).logits, ref) <= 0.03 * spread


def test_final_logit_softcap_bounds_logits(model):
    cfg, params = model
    big = jax.tree.map(lambda x: 10.0 * x, params)  # raw logits far beyond the cap
    tokens = _tokens(cfg)
    raw = _forward(big, tokens, cfg).logits
    cap = 2.0
    capped = _forward(big, tokens, dataclasses.replace(cfg, final_logit_softcap=cap)).logits
    assert float(jnp.max(jnp.abs(raw))) > 3 * cap
    assert float(jnp.max(jnp.abs(capped))) <= cap
    np.testing.assert_allclose(capped, cap * jnp.tanh(raw / cap), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ unstacked layers


def _double(x):
    return 2.0 * x


def test_unstacked_layers_equal_the_scan(model):
    """`unstack_layers` params (a Python loop over blocks, what decoding uses) give the scan's logits, captures and
    interventions, and with an unstacked cache the same cached logits."""
    cfg, params = model
    tokens = _tokens(cfg, seed=4)
    flat = lm.unstack_layers(params, cfg)
    assert "layers" not in flat and flat["layer_1"]["attn"]["q_proj"]["kernel"].shape == (
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
    )
    hooks = ("blocks.1.resid_mid", "embed")
    iv = (("blocks.0.mlp_out", _double),)
    a = _forward(params, tokens, cfg, capture=hooks, interventions=iv)
    b = _forward(flat, tokens, cfg, capture=hooks, interventions=iv)
    np.testing.assert_allclose(b.logits, a.logits, atol=ATOL, rtol=0)
    for name in hooks:
        np.testing.assert_allclose(b.captured[name], a.captured[name], atol=ATOL, rtol=0)
    cache = kv_cache.init_cache(cfg, 2, 16)
    c_stacked = lm.forward(params, tokens, cfg, kv_cache=cache)
    c_flat = lm.forward(flat, tokens, cfg, kv_cache=kv_cache.unstack(cache))
    np.testing.assert_allclose(c_flat.logits, c_stacked.logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(kv_cache.stack(c_flat.kv_cache).layers.k, c_stacked.kv_cache.layers.k, atol=ATOL)
    with pytest.raises(ValueError, match="disagree on the layer layout"):
        lm.forward(flat, tokens, cfg, kv_cache=cache)


# ------------------------------------------------------------------------------------------- short convolution


def _with_random_taps(cfg, seed=0):
    params = lm.init(cfg, jax.random.key(seed))
    taps = params["layers"]["conv"]["taps"]
    params["layers"]["conv"]["taps"] = 0.5 * jax.random.normal(jax.random.key(seed + 1), taps.shape)
    return params


def test_short_conv_starts_as_the_plain_block_and_reads_only_its_own_sequence(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, short_conv=3)
    plain = lm.init(tiny_cfg, jax.random.key(0))
    params = lm.init(cfg, jax.random.key(0))
    taps = params["layers"]["conv"]["taps"]
    assert taps.shape == (cfg.n_layers, 3, cfg.d_model) and not np.asarray(taps).any()
    assert lm.logical_axes(cfg)["layers"]["conv"]["taps"] == P("layers", None, "embed")
    with pytest.raises(ValueError, match="cannot express model.short_conv=3"):  # no HF family has it
        hf_families.lm_config_to_hf_config(cfg)
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, size=(2, 10)), jnp.int32)
    # zero taps (the init): exactly the plain model
    same = {**plain, "layers": {**plain["layers"], "conv": {"taps": taps}}}
    np.testing.assert_array_equal(lm.apply(same, tokens, cfg), lm.apply(plain, tokens, tiny_cfg))
    # random taps: a packed row (two segments, positions restarting) equals each sequence alone, and the taps change
    # the logits (they are read at all)
    params = _with_random_taps(cfg)
    a, b = tokens[0, :4], tokens[1, :6]
    row = jnp.concatenate([a, b])[None]
    seg = jnp.asarray([[0] * 4 + [1] * 6])
    pos = jnp.asarray([list(range(4)) + list(range(6))])
    packed = lm.forward(params, row, cfg, segment_ids_BT=seg, positions_BT=pos).logits[0]
    np.testing.assert_allclose(packed[:4], lm.apply(params, a[None], cfg)[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[4:], lm.apply(params, b[None], cfg)[0], atol=1e-5, rtol=0)
    assert np.abs(np.asarray(lm.apply(params, tokens, cfg) - lm.apply(same, tokens, cfg))).max() > 1e-4  # noise: 1e-7
    # causal: a later token never changes an earlier position's logits
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1 - 3) % (cfg.vocab_size - 3) + 3)
    np.testing.assert_array_equal(lm.apply(params, changed, cfg)[:, :6], lm.apply(params, tokens, cfg)[:, :6])
