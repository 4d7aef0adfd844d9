"""A vision-language model: ViT encoder -> projector -> image embeddings at placeholder tokens of a prefix-LM.

Glossary: B batch, T tokens, H/W/C image height/width/channels, N image tokens per image (ViT patches), Dv encoder
width, D LM width, V vocab.

Entry points (params are {"vision": ..., "projector": ..., "lm": ...}, plain nested dicts):
  init(cfg, rng) -> params
  apply(params, images_BHWC, tokens_BT, cfg, prefix_len_B=, ...) -> logits_BTV
  embed_inputs(params, images_BHWC, tokens_BT, cfg) -> embeds_BTD (what `lm.forward(embeds_BTD=)` reads)
  generate(params, cfg, images, prompts, max_new_tokens=, ...) -> inference.GenerateOutput (KV cache; image tokens
    are prefilled once, decoding is the LM's own loop)
  loss_fn(cfg) -> (params, batch) -> (loss, aux): next-token loss on the answer only
  param_groups(params) -> a label per leaf ("vision", "projector", "lm"): freezing through the loop's labels
  logical_axes(cfg), check_inputs(images, tokens, cfg), prompt_tokens(...), flops_per_example(cfg, seq_len)

A prompt row holds `cfg.image_token_id` placeholders where its image goes (PaliGemma's layout: N placeholders,
then BOS, then the prompt): the merge writes image token i of that row's image over the row's i-th placeholder.
A row with no placeholder is text-only and ignores its image row. With `prefix_lm` the image and the prompt form a
prefix with full attention among themselves (PaliGemma, big_vision), the answer is causal; `prefix_lm=False` is a
plain causal mask over everything (LLaVA). Images are BHWC floats in [-1, 1]; bad images and placeholder counts
that do not match the image token count are ValueErrors naming the shape, value or both counts before any jit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from framework import config as config_lib
from framework import inference
from framework.inference import reference, request
from framework.models import lm, vision
from framework.models.config import MLP_ACTIVATIONS
from framework.training.loss import next_token_loss

Params = dict[str, Any]
PROJECTORS = ("linear", "mlp")
GROUPS = ("vision", "projector", "lm")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """The encoder, the LM, the projector kind, the placeholder id and the mask (hashable: static under jit)."""

    vision: vision.ViTConfig
    lm: lm.LMConfig
    projector: str = "mlp"  # "linear" (PaliGemma, LLaVA-1) or "mlp" (2 layers with GELU, LLaVA-1.5)
    image_token_id: int = 100
    prefix_lm: bool = True  # image + prompt attend both ways (PaliGemma); False: causal throughout (LLaVA)

    def __post_init__(self):
        object.__setattr__(self, "vision", vision.ViTConfig.from_config(self.vision))
        object.__setattr__(self, "lm", lm.LMConfig.from_config(self.lm))
        if self.projector not in PROJECTORS:
            raise ValueError(f"model.projector must be one of {PROJECTORS}, got {self.projector!r}")
        t, c = self.image_token_id, self.lm
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < c.vocab_size:
            raise ValueError(f"model.image_token_id={t!r} must be an id in [0, model.lm.vocab_size={c.vocab_size})")
        if t in (c.pad_id, c.bos_id, *c.eos_ids):
            raise ValueError(f"model.image_token_id={t} is also a special token of the LM (pad/bos/eos)")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | VLMConfig) -> VLMConfig:
        """A VLMConfig from a ConfigDict/dict with sections `vision` and `lm`; unknown keys are an error."""
        if isinstance(config, VLMConfig):
            return config
        return cls(**config_lib.known_fields(cls, config, "model"))

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches


class Projector(nn.Module):
    """Encoder vectors [B, N, Dv] -> LM embeddings [B, N, D]: one linear layer, or linear-GELU-linear."""

    cfg: VLMConfig

    @nn.compact
    def __call__(self, x_BNE):
        c, Dv = self.cfg.lm, self.cfg.vision.d_model
        first = functools.partial(
            lm.Linear, c, "bnv,vd->bnd", (Dv, c.d_model), ("vision_embed", "embed"), Dv**-0.5, True
        )
        if self.cfg.projector == "linear":
            return first(name="linear")(x_BNE)
        h_BND = MLP_ACTIVATIONS["gelu"](first(name="fc1")(x_BNE))
        fc2 = lm.Linear(c, "bnd,de->bne", (c.d_model, c.d_model), ("mlp", "embed"), c.d_model**-0.5, True, name="fc2")
        return fc2(h_BND)


def _projector_params(cfg: VLMConfig, rng):
    x = jnp.zeros((1, 1, cfg.vision.d_model), cfg.lm.compute_dtype)
    return Projector(cfg).init(rng, x)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: VLMConfig, rng: jax.Array) -> Params:
    kv, kp, kl = jax.random.split(rng, 3)
    return {
        "vision": vision.init(cfg.vision, kv),
        "projector": nn.meta.unbox(_projector_params(cfg, kp)),
        "lm": lm.init(cfg.lm, kl),
    }


def init(cfg: VLMConfig | Mapping[str, Any], rng: jax.Array) -> Params:
    """Fresh parameters {"vision", "projector", "lm"} for `cfg` from the PRNG key `rng`."""
    return _init(VLMConfig.from_config(cfg), rng)


def logical_axes(cfg: VLMConfig | Mapping[str, Any]) -> Params:
    """PartitionSpecs of logical axis names mirroring the params tree."""
    cfg = VLMConfig.from_config(cfg)
    boxed = jax.eval_shape(functools.partial(_projector_params, cfg), jax.random.key(0))
    return {
        "vision": vision.logical_axes(cfg.vision),
        "projector": nn.get_partition_spec(boxed),
        "lm": lm.logical_axes(cfg.lm),
    }


def param_groups(params: Params) -> Params:
    """A label per param leaf: its top-level group ("vision", "projector", "lm"), for `loop.Task.param_labels`."""
    return {g: jax.tree.map(lambda _, g=g: g, sub) for g, sub in params.items()}


# ------------------------------------------------------------------------------------------------- inputs
def placeholder_counts(tokens_BT: Any, cfg: VLMConfig) -> np.ndarray:
    """Image placeholders per row, int [B] (numpy)."""
    return np.sum(np.asarray(tokens_BT) == cfg.image_token_id, axis=-1)


def check_inputs(images_BHWC: Any, tokens_BT: Any, cfg: VLMConfig | Mapping[str, Any]) -> None:
    """ValueError before any jit when images or placeholders do not fit: a bad image (rank, channels, size, dtype,
    pixel range: `vision.check_images`), a batch-size mismatch, or a row whose placeholder count is neither 0 (a
    text-only row) nor the N image tokens an image gives (the message names both counts)."""
    cfg = VLMConfig.from_config(cfg)
    if np.ndim(tokens_BT) != 2:
        raise ValueError(f"tokens_BT must be [B, T], got shape {np.shape(tokens_BT)}")
    B, N = np.shape(tokens_BT)[0], cfg.num_image_tokens
    if images_BHWC is not None:
        vision.check_images(images_BHWC, cfg.vision)
        if np.shape(images_BHWC)[0] != B:
            raise ValueError(f"images_BHWC has {np.shape(images_BHWC)[0]} images but tokens_BT has {B} rows")
    if isinstance(tokens_BT, jax.core.Tracer):
        return
    counts = placeholder_counts(tokens_BT, cfg)
    for b, n in enumerate(counts):
        if n and images_BHWC is None:
            raise ValueError(
                f"tokens_BT row {b} has {n} image placeholder tokens (id {cfg.image_token_id}) but no images were "
                "given (0 image tokens)"
            )
        if n not in (0, N):
            raise ValueError(
                f"tokens_BT row {b} has {n} image placeholder tokens (id {cfg.image_token_id}) but an image gives "
                f"{N} image tokens (vision grid {cfg.vision.grid[0]}x{cfg.vision.grid[1]}); a row holds 0 or {N}"
            )


def merge_image_embeddings(
    text_BTD: Float[Array, "B T D"], image_BND: Float[Array, "B N D"], tokens_BT: Int[Array, "B T"], image_token_id: int
) -> Float[Array, "B T D"]:
    """The text embeddings with row b's i-th placeholder replaced by image token i of image b (jit-safe)."""
    is_img_BT = tokens_BT == image_token_id
    idx_BT = jnp.clip(jnp.cumsum(is_img_BT, axis=1) - 1, 0, image_BND.shape[1] - 1)
    img_BTD = jnp.take_along_axis(image_BND, idx_BT[:, :, None], axis=1)
    return jnp.where(is_img_BT[:, :, None], img_BTD.astype(text_BTD.dtype), text_BTD)


def encode_images(params: Params, images_BHWC: Float[Array, "B H W C"], cfg: VLMConfig) -> Float[Array, "B N D"]:
    """Image tokens in the LM's embedding space: the encoder, then the projector."""
    x_BNE = vision._apply(params["vision"], images_BHWC, cfg.vision)
    return Projector(cfg).apply({"params": params["projector"]}, x_BNE).astype(cfg.lm.compute_dtype)


def _embed(params, images_BHWC, tokens_BT, cfg: VLMConfig):
    text_BTD = lm.embed(params["lm"], tokens_BT, cfg.lm)
    if images_BHWC is None:
        return text_BTD
    return merge_image_embeddings(text_BTD, encode_images(params, images_BHWC, cfg), tokens_BT, cfg.image_token_id)


def embed_inputs(
    params: Params, images_BHWC: Float[Array, "B H W C"] | None, tokens_BT: Int[Array, "B T"], cfg: VLMConfig
) -> Float[Array, "B T D"]:
    """The LM's input embeddings: the token lookup with image tokens written over the placeholders (checked first)."""
    cfg = VLMConfig.from_config(cfg)
    check_inputs(images_BHWC, tokens_BT, cfg)
    return _embed(params, None if images_BHWC is None else jnp.asarray(images_BHWC), jnp.asarray(tokens_BT), cfg)


def apply(
    params: Params,
    images_BHWC: Float[Array, "B H W C"] | None,
    tokens_BT: Int[Array, "B T"],
    cfg: VLMConfig | Mapping[str, Any],
    *,
    prefix_len_B: Int[Array, " B"] | None = None,
    **forward_kw,
) -> Float[Array, "B T V"]:
    """Logits [B, T, V] (fp32) of a batch of images and token rows; `prefix_len_B` gives the prefix-LM mask.

    `images_BHWC` may be None for a text-only batch. `forward_kw` go to `lm.forward` (positions_BT, logits_at, ...);
    for captured activations call `lm.forward(params["lm"], None, cfg.lm, embeds_BTD=embed_inputs(...))` directly.
    """
    cfg = VLMConfig.from_config(cfg)
    embeds_BTD = embed_inputs(params, images_BHWC, tokens_BT, cfg)
    return lm.forward(params["lm"], None, cfg.lm, embeds_BTD=embeds_BTD, prefix_len_B=prefix_len_B, **forward_kw).logits


def loss_fn(cfg: VLMConfig | Mapping[str, Any]):
    """`(params, batch) -> (loss, aux)`: next-token cross-entropy on `loss_mask` (the answer) for batches with
    "tokens", "loss_mask", "prefix_len" (used when `cfg.prefix_lm`) and "images" (absent: a text-only batch)."""
    cfg = VLMConfig.from_config(cfg)

    def fn(params, batch):
        embeds_BTD = _embed(params, batch.get("images"), batch["tokens"], cfg)
        prefix = batch["prefix_len"] if cfg.prefix_lm else None
        logits_BTV = lm.forward(params["lm"], None, cfg.lm, embeds_BTD=embeds_BTD, prefix_len_B=prefix).logits
        loss, aux = next_token_loss(logits_BTV, batch["tokens"], batch["loss_mask"])
        return loss, {"answer_token_accuracy": aux["correct"] / jnp.maximum(aux["tokens"], 1.0)}

    return fn


def prompt_tokens(cfg: VLMConfig, prompt_ids: np.ndarray, *, with_image: bool) -> np.ndarray:
    """A generation prompt: N placeholders (if `with_image`), BOS, then `prompt_ids` (int32, 1-D)."""
    head = [cfg.image_token_id] * (cfg.num_image_tokens if with_image else 0)
    bos = [] if cfg.lm.bos_id is None else [cfg.lm.bos_id]
    return np.asarray(head + bos + list(np.asarray(prompt_ids).tolist()), np.int32)


@functools.partial(jax.jit, static_argnames="cfg")
def _embed_jit(params, images_BHWC, tokens_BT, cfg):
    return _embed(params, images_BHWC, tokens_BT, cfg)


def generate(
    params: Params,
    cfg: VLMConfig | Mapping[str, Any],
    images: Any,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int,
    prefix_len: Sequence[int] | None = None,
    use_cache: bool = True,
    **generate_kw,
) -> inference.GenerateOutput:
    """Continues prompts that may hold images: `inference.generate` on the merged embeddings (KV cache).

    Args:
      images: None (text only), a [B, H, W, C] float array, or a list of [H, W, C] arrays / None per row (None rows
        are text-only and must hold no placeholders).
      prompts: B 1-D token arrays (lengths may differ), each with 0 or N placeholders (`prompt_tokens` builds one).
      prefix_len: per-row prefix lengths; default the whole prompt when `cfg.prefix_lm`, else none (causal).
      use_cache: False runs `reference.reference_generate` (no KV cache) on the same inputs, for parity checks.
      generate_kw: the rest of `inference.generate`'s arguments (temperature, rng, stop_tokens, processors ...).
    """
    cfg = VLMConfig.from_config(cfg)
    rows = [np.asarray(p) for p in prompts]
    if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
        raise ValueError(f"generate: prompts must be non-empty 1-D token arrays, got shapes {[r.shape for r in rows]}")
    B, T = len(rows), max(r.size for r in rows)
    block_BT = np.full((B, T), request.filler_id(cfg.lm), np.int32)  # a model may have no pad id
    for b, r in enumerate(rows):
        block_BT[b, : r.size] = r
    images_BHWC = _image_block(images, B, cfg)
    check_inputs(images_BHWC, block_BT, cfg)
    embeds = np.asarray(_embed_jit(params, None if images_BHWC is None else jnp.asarray(images_BHWC), block_BT, cfg))
    if prefix_len is None and cfg.prefix_lm:
        prefix_len = [r.size for r in rows]
    run = inference.generate if use_cache else reference.reference_generate
    return run(
        params["lm"],
        cfg.lm,
        rows,
        max_new_tokens=max_new_tokens,
        prompt_embeds=[embeds[b, : r.size] for b, r in enumerate(rows)],
        prefix_len=None if prefix_len is None else np.asarray(prefix_len, np.int32),
        **generate_kw,
    )


def _image_block(images: Any, B: int, cfg: VLMConfig) -> np.ndarray | None:
    """[B, H, W, C] from an array or a list with None for text-only rows (zeros there, never read)."""
    if images is None:
        return None
    if isinstance(images, (list, tuple)):
        if len(images) != B:
            raise ValueError(f"generate: {len(images)} images for {B} prompts (use None for a text-only row)")
        present = [np.asarray(im) for im in images if im is not None]
        if not present:
            return None
        for im in present:
            vision.check_images(im[None], cfg.vision, where="generate image")
        shape = present[0].shape
        return np.stack([np.zeros(shape, present[0].dtype) if im is None else np.asarray(im) for im in images])
    return np.asarray(images)


def flops_per_example(cfg: VLMConfig | Mapping[str, Any], seq_len: int) -> float:
    """Training FLOPs of one row (3x forward): the encoder on its image, the projector, the LM on seq_len tokens."""
    cfg = VLMConfig.from_config(cfg)
    Dv, D, N = cfg.vision.d_model, cfg.lm.d_model, cfg.num_image_tokens
    proj = 2 * N * (Dv * D + (D * D if cfg.projector == "mlp" else 0))
    return 3 * (vision.flops_per_image(cfg.vision) + proj) + lm.flops_per_token(cfg.lm, seq_len) * seq_len
