"""Llama/Gemma-style decoder LM as pure-functional Flax Linen modules.

Glossary: B batch, T time (queries), S cache slots, D model, H heads, K kv-heads, Dh head dim, F mlp, V vocab,
L layers.

Entry points (params are plain nested dicts; no module internals needed):
  init(cfg, rng) -> params
  apply(params, tokens_BT, cfg) -> logits_BTV
  forward(params, tokens_BT, cfg, embeds_BTD=, prefix_len_B=, positions_BT=, kv_cache=, capture=, interventions=)
    -> Output (embeddings in place of tokens; a prefix-LM mask)
  embed(params, tokens_BT, cfg) -> the embedding lookup forward computes (to build `embeds_BTD`)
  flops(cfg, prompt_tokens, new_tokens) -> FLOPs of a prefill plus decoding (the cost figure of every study)
  logical_axes(cfg) -> pytree of PartitionSpec with logical axis names (for framework.sharding)
`cfg` is an `LMConfig` (defined in framework.models.config, re-exported here) or a mapping of its fields.

Parameters are stored stacked ([L, ...] under "layers") whatever the config. `scan_layers=True` runs them as one
`nn.scan` (compile time independent of depth); `scan_layers=False` runs the blocks as a Python loop over static
slices of the same stacked tree. On CPU the loop trains ~1.2x faster: the scan's backward stacks every layer's
residuals and gradients into [L, ...] buffers (zero-filled, written and read back with dynamic slices), work the loop
does not have. Hookpoints per layer (for SAEs and probes):
`blocks.{l}.resid_pre | attn_out | resid_mid | mlp_out | resid_post`, plus `embed` and `final_norm`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from framework.models import attention as attn_lib
from framework.models.config import MLP_ACTIVATIONS, REMAT_POLICIES, LMConfig  # noqa: F401 (re-exported)
from framework.models.cost import flops, flops_per_token  # noqa: F401 (re-exported: lm.flops is the convention)
from framework.models.layers import (  # noqa: F401 (re-exported: lm.Linear, lm.RMSNorm, ... are the model's names)
    Linear,
    RMSNorm,
    Rope,
    ShortConv,
    _normal,
    _param,
    apply_rope,
    rope_tables,
)

Params = dict[str, Any]
LAYER_HOOKPOINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


def _attention_core(
    c: LMConfig, window, q_BTHD, k_BTKD, v_BTKD, layer_cache, pos_BT, seg_BT, page_table, prefix_B=None
):
    """Attention of q over k/v (or over the cache) with a static sliding `window` (None = full causal) and, with
    `prefix_B`, the prefix-LM mask (every path: the xla mask, the flash kernels, the cache's prefill)."""
    # Only the features a model uses are passed on, so plain Llama calls are exactly what they always were.
    extra = dict(window=window, softcap=c.attn_logit_softcap, sm_scale=c.query_pre_attn_scalar and c.sm_scale)
    extra = {k: v for k, v in extra.items() if v is not None}
    if layer_cache is not None:
        if prefix_B is not None:
            extra["prefix_len_B"] = prefix_B
        # The cache layer (framework.inference.kv_cache: dense or paged, float or int8) writes this chunk at its
        # positions and attends over everything cached so far; the model never sees its layout.
        return layer_cache.attend(
            page_table, q_BTHD, k_BTKD, v_BTKD, pos_BT, impl=c.attention_impl, compute_dtype=c.compute_dtype, **extra
        )
    if c.attention_impl in attn_lib.FLASH_IMPLS:
        o_BTHD = attn_lib.flash_self_attention(
            q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=seg_BT, impl=c.attention_impl, prefix_len_B=prefix_B, **extra
        )
        return o_BTHD, None
    mask_BTS = attn_lib.make_mask(
        pos_BT, pos_BT, causal=True, q_segment_BT=seg_BT, kv_segment_BS=seg_BT, window=window, prefix_len_B=prefix_B
    )
    extra.pop("window", None)
    return attn_lib.dot_product_attention(
        q_BTHD, k_BTKD, v_BTKD, mask_BTS=mask_BTS, impl=c.attention_impl, **extra
    ), None


class Attention(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, x_BTD, pos_BT, seg_BT, layer_cache, page_table, layer_idx, rope: Rope, prefix_B=None):
        c = self.cfg
        D, H, K, Dh = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        std = c.init_std
        proj = functools.partial(Linear, c, "btd,dhk->bthk")
        q_BTHD = proj((D, H, Dh), ("embed", "heads", "head_dim"), std, c.qkv_bias, name="q_proj")(x_BTD)
        k_BTKD = proj((D, K, Dh), ("embed", "kv_heads", "head_dim"), std, c.qkv_bias, name="k_proj")(x_BTD)
        v_BTKD = proj((D, K, Dh), ("embed", "kv_heads", "head_dim"), std, c.qkv_bias, name="v_proj")(x_BTD)
        q_BTHD = apply_rope(q_BTHD, rope)
        k_BTKD = apply_rope(k_BTKD, rope)
        if layer_cache is not None and seg_BT is not None:
            raise ValueError("segment_ids (packed rows) are for cache-free forward passes, not decoding")
        args = (q_BTHD, k_BTKD, v_BTKD, layer_cache, pos_BT, seg_BT, page_table, prefix_B)
        windows = c.layer_windows
        distinct = sorted(set(windows), key=lambda w: -1 if w is None else w)
        if len(distinct) == 1 or isinstance(layer_idx, int):
            o_BTHD, layer_cache = _attention_core(c, windows[layer_idx if isinstance(layer_idx, int) else 0], *args)
        else:
            # Local and global layers under one nn.scan: the layer index is traced, so pick the (static) window by
            # lax.switch over the distinct windows; every kernel still sees a static window.
            branch = jnp.asarray([distinct.index(w) for w in windows], jnp.int32)[layer_idx]
            fns = [functools.partial(_attention_core, c, w) for w in distinct]
            o_BTHD, layer_cache = jax.lax.switch(branch, fns, *args)
        o_proj = Linear(
            c, "bthk,hkd->btd", (H, Dh, D), ("heads", "head_dim", "embed"), std / (2 * c.n_layers) ** 0.5, name="o_proj"
        )
        return o_proj(o_BTHD), layer_cache


class MLP(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.cfg
        up = functools.partial(Linear, c, "btd,df->btf", (c.d_model, c.d_ff), ("embed", "mlp"), c.init_std)
        h_BTF = MLP_ACTIVATIONS[c.mlp_activation](up(name="gate_proj")(x_BTD)) * up(name="up_proj")(x_BTD)
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "seq", "mlp"))
        down = Linear(
            c,
            "btf,fd->btd",
            (c.d_ff, c.d_model),
            ("mlp", "embed"),
            c.init_std / (2 * c.n_layers) ** 0.5,
            name="down_proj",
        )
        return down(h_BTF)


class Embed(nn.Module):
    """Token embedding; `attend` is the tied output projection."""

    cfg: LMConfig

    def setup(self):
        # Unit-variance rows feed the pre-norm stack; tied, the table is also the output layer, so it starts at
        # d_model**-0.5 to give unit-scale logits instead of sqrt(d_model)-scale ones.
        std = self.cfg.d_model**-0.5 if self.cfg.tie_embeddings else 1.0
        self.embedding = _param(
            self, "embedding", (self.cfg.vocab_size, self.cfg.d_model), ("vocab", "embed"), _normal(std)
        )

    def __call__(self, tokens_BT):
        # Callers validate ids at the boundary (framework.tasks.tokenizer.check_token_ids): jnp.take clamps silently.
        x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(self.cfg.compute_dtype)
        if self.cfg.scale_embeddings:  # Gemma: sqrt(d_model) rounded to the weights' dtype first, as in HF
            x_BTD = x_BTD * jnp.asarray(self.cfg.d_model**0.5, self.cfg.params_dtype).astype(self.cfg.compute_dtype)
        return x_BTD

    def attend(self, x_BTD):
        return jnp.einsum(
            "btd,vd->btv", x_BTD, self.embedding.astype(self.cfg.compute_dtype), preferred_element_type=jnp.float32
        )


Intervention = Callable[[jax.Array], jax.Array]


class Block(nn.Module):
    """One pre-norm transformer block; called by nn.scan with (carry x, layer index, layer cache)."""

    cfg: LMConfig
    interventions: tuple[tuple[int, str, Intervention], ...] = ()

    def _hook(self, name: str, x, layer_idx):
        for layer, point, fn in self.interventions:
            if point == name:
                if isinstance(layer_idx, int):  # unstacked layers: the index is static
                    x = fn(x) if layer_idx == layer else x
                else:
                    x = jax.lax.cond(layer_idx == layer, fn, lambda y: y, x)
        self.sow("intermediates", name, x)  # after interventions: `capture` returns what the model goes on with
        return x

    @nn.compact
    def __call__(self, x_BTD, layer_idx, layer_cache, pos_BT, seg_BT, page_table, rope, prefix_B=None):
        c = self.cfg
        x_BTD = self._hook("resid_pre", x_BTD, layer_idx)
        n_BTD = RMSNorm(c, name="attn_norm")(x_BTD)
        if c.short_conv:
            n_BTD, layer_cache = ShortConv(c, name="conv")(n_BTD, pos_BT, seg_BT, layer_cache, page_table)
        a_BTD, layer_cache = Attention(c, name="attn")(
            n_BTD, pos_BT, seg_BT, layer_cache, page_table, layer_idx, rope, prefix_B
        )
        if c.post_norms:  # Gemma-2 sandwich: the sublayer output is normalised before the residual add
            a_BTD = RMSNorm(c, name="post_attn_norm")(a_BTD)
        a_BTD = self._hook("attn_out", a_BTD, layer_idx)
        h_BTD = self._hook("resid_mid", x_BTD + a_BTD, layer_idx)
        m_BTD = MLP(c, name="mlp")(RMSNorm(c, name="mlp_norm")(h_BTD))
        if c.post_norms:
            m_BTD = RMSNorm(c, name="post_mlp_norm")(m_BTD)
        m_BTD = self._hook("mlp_out", m_BTD, layer_idx)
        out_BTD = self._hook("resid_post", h_BTD + m_BTD, layer_idx)
        out_BTD = nn.with_logical_constraint(out_BTD, ("batch", "seq", "embed"))
        return out_BTD, layer_cache


class Decoder(nn.Module):
    """Embedding, the block stack and the output head.

    `unstacked=False`: one nn.scan over stacked [L, ...] params under "layers" (the training layout). `unstacked=True`:
    a Python loop over blocks named "layer_{l}" with their own params (`unstack_layers`) and a tuple of per-layer
    caches; decoding uses it because a scanned layer reads its weights (and cache) through per-step dynamic slices,
    which XLA copies every token.
    """

    cfg: LMConfig
    interventions: tuple[tuple[int, str, Intervention], ...] = ()
    top_interventions: tuple[tuple[str, Intervention], ...] = ()
    unstacked: bool = False

    def _top_hook(self, name, x):
        for point, fn in self.top_interventions:
            if point == name:
                x = fn(x)
        self.sow("intermediates", f"hook_{name}", x)  # prefixed: "embed" is also a submodule's scope
        return x

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        pos_BT,
        layer_cache,
        seg_BT=None,
        page_table=None,
        logits_at_BN=None,
        embeds_BTD=None,
        prefix_B=None,
    ):
        c = self.cfg
        embed = Embed(c, name="embed")
        x_BTD = embed(tokens_BT) if embeds_BTD is None else embeds_BTD.astype(c.compute_dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))
        x_BTD = self._top_hook("embed", x_BTD)

        rope = rope_tables(pos_BT, c.head_dim, c.rope_theta)
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
        if self.unstacked:
            caches = []
            for l in range(c.n_layers):
                cache_l = None if layer_cache is None else layer_cache[l]
                x_BTD, cache_l = block(c, self.interventions, name=f"layer_{l}")(
                    x_BTD, l, cache_l, pos_BT, seg_BT, page_table, rope, prefix_B
                )
                caches.append(cache_l)
            layer_cache = None if layer_cache is None else tuple(caches)
        else:
            layers = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.interventions, name="layers")
            x_BTD, layer_cache = layers(
                x_BTD, jnp.arange(c.n_layers), layer_cache, pos_BT, seg_BT, page_table, rope, prefix_B
            )

        x_BTD = self._top_hook("final_norm", RMSNorm(c, name="final_norm")(x_BTD))
        if logits_at_BN is not None:  # only these positions reach the output layer: [B, N, D]
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_BN[:, :, None], axis=1)
        if c.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = Linear(
                c, "btd,dv->btv", (c.d_model, c.vocab_size), ("embed", "vocab"), c.init_std, name="lm_head"
            )(x_BTD).astype(jnp.float32)
        if c.final_logit_softcap:
            logits_BTV = c.final_logit_softcap * jnp.tanh(logits_BTV / c.final_logit_softcap)
        return logits_BTV, layer_cache


class Output(NamedTuple):
    """What `forward` returns: fp32 logits ([B, N, V] with `logits_at`), the updated KV cache or None, and captured
    hookpoint activations."""

    logits: Float[Array, "B T V"]
    kv_cache: Any
    captured: dict[str, jax.Array]


def hookpoints(cfg: LMConfig) -> tuple[str, ...]:
    """Every hookpoint name of a model: `embed`, `blocks.{l}.{point}`, `final_norm`."""
    layer_points = tuple(f"blocks.{l}.{p}" for l in range(cfg.n_layers) for p in LAYER_HOOKPOINTS)
    return ("embed",) + layer_points + ("final_norm",)


def _parse_hookpoint(name: str, cfg: LMConfig) -> tuple[int | None, str]:
    if name in ("embed", "final_norm"):
        return None, name
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in LAYER_HOOKPOINTS:
        layer = int(parts[1])
        if layer < cfg.n_layers:
            return layer, parts[2]
    raise ValueError(
        f"unknown hookpoint {name!r}; expected 'embed', 'final_norm' or 'blocks.<0..{cfg.n_layers - 1}>."
        f"<{'|'.join(LAYER_HOOKPOINTS)}>'"
    )


def forward(
    params: Params,
    tokens_BT: Int[Array, "B T"] | None,
    cfg: LMConfig | Mapping[str, Any],
    *,
    embeds_BTD: Float[Array, "B T D"] | None = None,
    prefix_len_B: Int[Array, " B"] | None = None,
    positions_BT: Int[Array, "B T"] | None = None,
    segment_ids_BT: Int[Array, "B T"] | None = None,
    kv_cache: Any = None,
    capture: Sequence[str] = (),
    interventions: Mapping[str, Intervention] | None = None,
    logits_at: Int[Array, "B N"] | None = None,
) -> Output:
    """Runs the LM; optionally on embeddings, with a prefix-LM mask, a KV cache, captured or edited hookpoints.

    `embeds_BTD` replaces the embedding lookup (pass `tokens_BT=None`; B and T come from the embeddings): rows are
    taken as already in the residual stream's scale, i.e. what the `embed` hookpoint sees, so for Gemma
    (`scale_embeddings`) pass the scaled lookup. `embed(params, tokens_BT, cfg)` returns exactly what the lookup gives,
    to build or mix inputs (e.g. image tokens merged into a text row): feeding it back gives the token logits.
    `prefix_len_B` [B] gives a prefix-LM mask (PaliGemma's): a query at position p sees key position s iff
    s <= p or (p < prefix_len and s < prefix_len), i.e. full attention among the first prefix_len positions of its
    row and causal attention after them; sliding windows still bound how far back a query looks (s > p - window)
    but not the prefix's keys ahead of it, as in HF Gemma-2. 0 is plain causal attention. Every attention path
    honours it (the xla mask, the flash kernels, the KV cache's prefill); with a KV cache the whole prefix must be in
    one call (a query sees only keys already written), and later chunks and decode steps need nothing extra: a
    query at p >= prefix_len already sees every earlier key causally.
    `positions_BT` defaults to 0..T-1 in every row. `segment_ids_BT` marks packed rows: tokens attend only within
    their own segment (pass per-segment positions too; not with `prefix_len_B`). `kv_cache` is a
    `framework.inference.kv_cache.KVCache` (dense or paged, float or int8): the chunk is written at its positions
    and attends over the cache; the updated cache comes back in `Output.kv_cache`. `interventions` maps hookpoint
    names to functions applied to the activation there (e.g. an SAE's reconstruction); `capture` lists hookpoints
    whose activations (after any intervention) are returned. `logits_at` [B, N] (indices into each row's T tokens)
    computes the logits at those tokens only, `Output.logits` [B, N, V]: what decoding needs from a prompt, without
    the [B, T, V] tensor (HF's `logits_to_keep`).
    """
    cfg = LMConfig.from_config(cfg)
    if prefix_len_B is not None:
        prefix_len_B = jnp.asarray(prefix_len_B)
    B, T = _check_inputs(tokens_BT, embeds_BTD, prefix_len_B, segment_ids_BT, cfg)
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if prefix_len_B is not None:
        prefix_len_B = prefix_len_B.astype(jnp.int32)
    layer_iv, top_iv = [], []
    for name, fn in (interventions or {}).items():
        layer, point = _parse_hookpoint(name, cfg)
        (top_iv.append((point, fn)) if layer is None else layer_iv.append((layer, point, fn)))
    wanted = [(name, *_parse_hookpoint(name, cfg)) for name in capture]
    unstacked = "layers" not in params
    layers, page_table = (None, None) if kv_cache is None else (kv_cache.layers, kv_cache.page_table)
    if kv_cache is not None and unstacked != isinstance(layers, tuple):
        raise ValueError(
            "params and kv_cache disagree on the layer layout: unstacked params (lm.unstack_layers) need an "
            "unstacked cache (kv_cache.unstack) and stacked params a stacked cache"
        )
    restack = not cfg.scan_layers and not unstacked
    if restack:  # scan_layers=False: the Python loop over static slices of the stacked weights (and cache)
        params = unstack_layers(params, cfg)
        if layers is not None:
            layers = tuple(jax.tree.map(lambda a, l=l: a[l], layers) for l in range(cfg.n_layers))
        unstacked = True
    if not unstacked:
        _check_scannable(params["layers"])
    model = Decoder(cfg, tuple(layer_iv), tuple(top_iv), unstacked)
    args = (tokens_BT, positions_BT, layers, segment_ids_BT, page_table, logits_at, embeds_BTD, prefix_len_B)
    if wanted:
        (logits, layers), state = model.apply({"params": params}, *args, mutable=["intermediates"])
        inter = state["intermediates"]
        captured = {
            name: (
                inter[f"hook_{point}"][0]
                if layer is None
                else inter[f"layer_{layer}"][point][0]
                if unstacked
                else inter["layers"][point][0][layer]
            )
            for name, layer, point in wanted
        }
    else:
        logits, layers = model.apply({"params": params}, *args)
        captured = {}
    if kv_cache is None:
        return Output(logits, None, captured)
    if restack:
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return Output(logits, kv_cache.replace(layers=layers), captured)


def _check_inputs(tokens_BT, embeds_BTD, prefix_len_B, segment_ids_BT, cfg: LMConfig) -> tuple[int, int]:
    """(B, T) of the input; ValueErrors naming the argument for inputs that do not fit (shapes only: jit-safe)."""
    if embeds_BTD is None:
        if tokens_BT is None:
            raise ValueError("lm.forward: pass tokens_BT [B, T] or embeds_BTD [B, T, D]; both are None")
        if jnp.ndim(tokens_BT) != 2:
            raise ValueError(f"lm.forward: tokens_BT must be [B, T], got shape {jnp.shape(tokens_BT)}")
        B, T = jnp.shape(tokens_BT)
    else:
        if tokens_BT is not None:
            raise ValueError(
                "lm.forward: embeds_BTD replaces the token lookup; pass tokens_BT=None with it (got both; "
                "lm.embed(params, tokens, cfg) gives the lookup to mix into embeddings)"
            )
        if jnp.ndim(embeds_BTD) != 3 or jnp.shape(embeds_BTD)[-1] != cfg.d_model:
            raise ValueError(
                f"lm.forward: embeds_BTD must be [B, T, D={cfg.d_model}] (model.d_model), got shape "
                f"{jnp.shape(embeds_BTD)}"
            )
        if not jnp.issubdtype(jnp.result_type(embeds_BTD), jnp.floating):
            raise ValueError(f"lm.forward: embeds_BTD must be floating point, got {jnp.result_type(embeds_BTD)}")
        B, T, _ = jnp.shape(embeds_BTD)
    if prefix_len_B is not None:
        if jnp.shape(prefix_len_B) != (B,) or not jnp.issubdtype(jnp.result_type(prefix_len_B), jnp.integer):
            raise ValueError(
                f"lm.forward: prefix_len_B must be integers of shape [B={B}], got {jnp.result_type(prefix_len_B)} "
                f"of shape {jnp.shape(prefix_len_B)}"
            )
        if segment_ids_BT is not None:
            raise ValueError(
                "lm.forward: prefix_len_B applies to unpacked rows; it cannot be combined with segment_ids_BT "
                "(packed rows restart their positions, and one prefix per row cannot describe several segments)"
            )
    return B, T


def embed(params: Params, tokens_BT: Int[Array, "B T"], cfg: LMConfig | Mapping[str, Any]) -> Float[Array, "B T D"]:
    """The embedding lookup of `tokens_BT` exactly as `forward` computes it (Gemma's sqrt(d_model) scale included).

    It is what the `embed` hookpoint sees and what `forward(..., embeds_BTD=)` expects: build or mix inputs from it
    (e.g. a VLM writing image embeddings over placeholder tokens). Ids are not checked here (jnp.take clamps).
    """
    cfg = LMConfig.from_config(cfg)
    return Embed(cfg).apply({"params": params["embed"]}, jnp.asarray(tokens_BT))


def _check_scannable(layer_params: Params) -> None:
    """Rejects what flax's nn.scan cannot run with a clear message (its own error names no cause)."""
    leaves = jax.tree.leaves(layer_params, is_leaf=lambda x: hasattr(x, "impl"))
    if any(getattr(leaf, "impl", None) == "interpret_tpu" for leaf in leaves):
        raise ValueError(
            "quantised weights with impl='interpret_tpu' cannot run inside the layer scan (model.scan_layers=True): "
            "TPU interpret mode calls back to the host (io callbacks), which flax's nn.scan rejects; set "
            "model.scan_layers=False or use impl='interpret'"
        )


def unstack_layers(params: Params, cfg: LMConfig | Mapping[str, Any]) -> Params:
    """The same weights with the stacked "layers" tree split into "layer_0" ... "layer_{L-1}" (static slices).

    `forward` accepts either layout; the unstacked one runs the blocks as a Python loop (see `Decoder`), which is what
    the decode loop wants: the slices are taken once, outside the per-token loop.
    """
    cfg = LMConfig.from_config(cfg)
    out = {k: v for k, v in params.items() if k != "layers"}
    for l in range(cfg.n_layers):
        out[f"layer_{l}"] = jax.tree.map(lambda a, l=l: a[l], params["layers"])
    return out


def apply(
    params: Params, tokens_BT: Int[Array, "B T"], cfg: LMConfig | Mapping[str, Any], **kwargs
) -> Float[Array, "B T V"]:
    """Logits [B, T, V] (fp32) of `tokens` under `params`; keyword arguments as in `forward`."""
    return forward(params, tokens_BT, cfg, **kwargs).logits


def _boxed_variables(cfg: LMConfig, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(cfg).init(rng, tokens, tokens, None)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: LMConfig, rng: jax.Array) -> Params:
    return nn.meta.unbox(_boxed_variables(cfg, rng)["params"])


def init(cfg: LMConfig | Mapping[str, Any], rng: jax.Array) -> Params:
    """Fresh parameters (a plain nested dict of arrays) for `cfg` from the PRNG key `rng`."""
    return _init(LMConfig.from_config(cfg), rng)


def logical_axes(cfg: LMConfig | Mapping[str, Any]) -> Params:
    """PartitionSpecs of logical axis names (`layers`, `embed`, `heads`, ...) mirroring the params tree."""
    cfg = LMConfig.from_config(cfg)
    boxed = jax.eval_shape(functools.partial(_boxed_variables, cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def param_count(cfg: LMConfig | Mapping[str, Any], *, include_embedding: bool = True) -> int:
    """Number of parameters; `include_embedding=False` leaves out the input embedding table."""
    cfg = LMConfig.from_config(cfg)
    shapes = jax.eval_shape(functools.partial(_init, cfg), jax.random.key(0))
    n = sum(int(x.size) for x in jax.tree.leaves(shapes))
    return n if include_embedding else n - cfg.vocab_size * cfg.d_model
