"""A Vision Transformer (SigLIP-style) as pure functions over plain param dicts: patches in, one vector per patch out.

Glossary: B batch, H/W image height/width in pixels, C channels, P patch side, N patches (= image tokens),
K patch pixels (P*P*C), D model, Hd heads, Dh head dim, F mlp, L layers.

Entry points (params are plain nested dicts):
  init(cfg, rng) -> params
  apply(params, images_BHWC, cfg) -> x_BND (after the final LayerNorm: what a projector reads)
  check_images(images_BHWC, cfg) -> ValueError naming the shape, dtype or value that does not fit (numpy, no jit)
  logical_axes(cfg) -> PartitionSpec tree of logical axis names
  flops_per_image(cfg) -> training-free forward FLOPs of one image (2 x multiply-adds, attention included)

The architecture is SigLIP's vision tower (PaliGemma's encoder): patchify as reshape + linear (exactly a stride-P
convolution), learned (or fixed 2-D sin-cos) position embeddings, pre-norm blocks of LayerNorm -> multi-head
self-attention (q/k/v/o with biases, full bidirectional attention through `attention.dot_product_attention`) and
LayerNorm -> GELU MLP, then a final LayerNorm. Blocks are stored stacked ([L, ...] under "layers") and applied as a
Python loop over static slices. Images are BHWC floats in [-1, 1] (SigLIP's normalisation); patches are numbered
row-major, as a convolution's output flattened over (h, w).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from framework import config as config_lib
from framework.models import attention as attn_lib
from framework.models.config import _DTYPES, MLP_ACTIVATIONS
from framework.models.lm import Linear

Params = dict[str, Any]
POSITION_EMBEDDINGS = ("learned", "sincos")
PIXEL_RANGE = (-1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of the vision encoder (hashable: a static jit argument)."""

    image_height: int = 32
    image_width: int = 64
    channels: int = 1
    patch_size: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    pos_embedding: str = "learned"  # "learned" (SigLIP) or "sincos" (fixed 2-D sin-cos, no parameters)
    mlp_activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field for any inconsistent setting."""
        for name in ("image_height", "image_width", "channels", "patch_size", "d_model", "n_layers", "n_heads", "d_ff"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"vision.{name} must be a positive int, got {v!r}")
        for name in ("image_height", "image_width"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(
                    f"vision.{name}={getattr(self, name)} is not a multiple of vision.patch_size={self.patch_size}"
                )
        if self.d_model % self.n_heads:
            raise ValueError(f"vision.d_model={self.d_model} is not divisible by vision.n_heads={self.n_heads}")
        if self.pos_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"vision.pos_embedding must be one of {POSITION_EMBEDDINGS}, got {self.pos_embedding!r}")
        if self.pos_embedding == "sincos" and self.d_model % 4:
            raise ValueError(f"vision.pos_embedding='sincos' needs vision.d_model % 4 == 0, got {self.d_model}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"vision.mlp_activation must be one of {sorted(MLP_ACTIVATIONS)}, got {self.mlp_activation!r}"
            )
        if self.attention_impl != "xla":
            raise ValueError(
                f"vision.attention_impl={self.attention_impl!r}: the encoder's bidirectional attention runs on 'xla' "
                "(the flash kernels are causal)"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"vision.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | ViTConfig) -> ViTConfig:
        """A ViTConfig from a ConfigDict/dict (e.g. `config.model.vision`); unknown keys are an error."""
        if isinstance(config, ViTConfig):
            return config
        return cls(**config_lib.known_fields(cls, config, "vision"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        return self.image_height // self.patch_size, self.image_width // self.patch_size

    @property
    def num_patches(self) -> int:
        """N: the number of image tokens one image becomes."""
        gh, gw = self.grid
        return gh * gw

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]


def _param(module: nn.Module, name: str, shape, axes, init):
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), module.cfg.params_dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias, in fp32."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x_BND):
        D = x_BND.shape[-1]
        scale = _param(self, "scale", (D,), ("embed",), nn.initializers.ones).astype(jnp.float32)
        bias = _param(self, "bias", (D,), ("embed",), nn.initializers.zeros).astype(jnp.float32)
        x = x_BND.astype(jnp.float32)
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps)
        return (y * scale + bias).astype(self.cfg.compute_dtype)


class Block(nn.Module):
    """One pre-norm encoder block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x_BND):
        c = self.cfg
        D, Hd, Dh, std = c.d_model, c.n_heads, c.head_dim, c.init_std
        proj = functools.partial(Linear, c, "btd,dhk->bthk", (D, Hd, Dh), ("embed", "heads", "head_dim"), std, True)
        h_BND = LayerNorm(c, name="attn_norm")(x_BND)
        q, k, v = (proj(name=f"{n}_proj")(h_BND) for n in "qkv")
        B, N = x_BND.shape[:2]
        mask_BNN = jnp.ones((B, N, N), bool)  # every patch sees every patch
        o_BNHD = attn_lib.dot_product_attention(q, k, v, mask_BTS=mask_BNN, impl=c.attention_impl)
        o = Linear(c, "bthk,hkd->btd", (Hd, Dh, D), ("heads", "head_dim", "embed"), std, True, name="o_proj")
        x_BND = x_BND + o(o_BNHD)
        h_BND = LayerNorm(c, name="mlp_norm")(x_BND)
        up = Linear(c, "btd,df->btf", (D, c.d_ff), ("embed", "mlp"), std, True, name="fc1")
        down = Linear(c, "btf,fd->btd", (c.d_ff, D), ("mlp", "embed"), std, True, name="fc2")
        return x_BND + down(MLP_ACTIVATIONS[c.mlp_activation](up(h_BND)))


class Stem(nn.Module):
    """Patchify (reshape + linear = a stride-P convolution) and add position embeddings."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images_BHWC):
        c = self.cfg
        patches_BNK = patchify(images_BHWC.astype(c.compute_dtype), c.patch_size)
        K = patches_BNK.shape[-1]
        x_BND = Linear(c, "btk,kd->btd", (K, c.d_model), ("patch", "embed"), K**-0.5, True, name="patch")(patches_BNK)
        if c.pos_embedding == "learned":
            pos_ND = _param(self, "pos_embedding", (c.num_patches, c.d_model), ("patches", "embed"), _normal(0.02))
        else:
            pos_ND = jnp.asarray(sincos_2d(*c.grid, c.d_model))
        return x_BND + pos_ND.astype(c.compute_dtype)[None]


def _normal(std):
    return nn.initializers.normal(stddev=std)


def patchify(images_BHWC: Float[Array, "B H W C"], patch: int) -> Float[Array, "B N K"]:
    """Non-overlapping P x P patches, row-major over the grid, each flattened in (row, column, channel) order."""
    B, H, W, C = images_BHWC.shape
    x = images_BHWC.reshape(B, H // patch, patch, W // patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def sincos_2d(grid_h: int, grid_w: int, d_model: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings [N, D] (MoCo v3 / big_vision's `posemb_sincos_2d`)."""
    y, x = np.mgrid[:grid_h, :grid_w]
    omega = 1.0 / temperature ** (np.arange(d_model // 4) / (d_model // 4 - 1 if d_model > 4 else 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def _boxed(cfg: ViTConfig, rng: jax.Array):
    images = jnp.zeros((1, cfg.image_height, cfg.image_width, cfg.channels), cfg.compute_dtype)
    k_stem, k_layers, k_norm = jax.random.split(rng, 3)
    stem = Stem(cfg).init(k_stem, images)["params"]
    x = jnp.zeros((1, cfg.num_patches, cfg.d_model), cfg.compute_dtype)
    layers = jax.vmap(lambda k: Block(cfg).init(k, x)["params"])(jax.random.split(k_layers, cfg.n_layers))
    norm = LayerNorm(cfg).init(k_norm, x)["params"]
    return {**stem, "layers": layers, "final_norm": norm}


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: ViTConfig, rng: jax.Array) -> Params:
    return nn.meta.unbox(_boxed(cfg, rng))


def init(cfg: ViTConfig | Mapping[str, Any], rng: jax.Array) -> Params:
    """Fresh encoder parameters for `cfg` from the PRNG key `rng`."""
    return _init(ViTConfig.from_config(cfg), rng)


def logical_axes(cfg: ViTConfig | Mapping[str, Any]) -> Params:
    """PartitionSpecs of logical axis names mirroring the params tree (stacked layers lead with `layers`)."""
    cfg = ViTConfig.from_config(cfg)
    boxed = jax.eval_shape(functools.partial(_boxed, cfg), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    # vmap adds the layer axis to the values but not to the boxes' names
    specs["layers"] = jax.tree.map(
        lambda s: jax.sharding.PartitionSpec("layers", *s),
        specs["layers"],
        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec),
    )
    return specs


def check_images(images_BHWC: Any, cfg: ViTConfig | Mapping[str, Any], *, where: str = "images_BHWC") -> None:
    """ValueError naming the shape, dtype or pixel value when images do not fit the encoder; runs before any jit.

    Expected: rank 4 [B, H, W, C] with (H, W, C) = (image_height, image_width, channels), a floating dtype, values
    in [-1, 1]. Values are checked only when concrete (not under a trace).
    """
    cfg = ViTConfig.from_config(cfg)
    shape = tuple(np.shape(images_BHWC))
    want = (cfg.image_height, cfg.image_width, cfg.channels)
    if len(shape) != 4:
        raise ValueError(f"{where}: expected rank 4 [B, H, W, C] with (H, W, C) = {want}, got shape {shape}")
    if shape[3] != cfg.channels:
        raise ValueError(f"{where}: {shape[3]} channels (shape {shape}), expected vision.channels={cfg.channels}")
    P = cfg.patch_size
    if shape[1] % P or shape[2] % P:
        raise ValueError(
            f"{where}: image size {shape[1]}x{shape[2]} (shape {shape}) is not a multiple of vision.patch_size={P}"
        )
    if shape[1:3] != want[:2]:
        raise ValueError(f"{where}: image size {shape[1]}x{shape[2]} (shape {shape}), expected {want[0]}x{want[1]}")
    dtype = np.dtype(images_BHWC.dtype if hasattr(images_BHWC, "dtype") else np.asarray(images_BHWC).dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{where}: dtype {dtype}, expected floating point pixels in [-1, 1] (uint8 images: x / 127.5 - 1)"
        )
    if isinstance(images_BHWC, jax.core.Tracer):
        return
    arr = np.asarray(images_BHWC, np.float32)
    lo, hi = PIXEL_RANGE
    bad = ~((arr >= lo) & (arr <= hi))  # NaN is bad too
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{where}: pixel {pos} = {float(arr[pos])} is outside [{lo}, {hi}] (SigLIP normalisation)")


def apply(params: Params, images_BHWC: Float[Array, "B H W C"], cfg: ViTConfig | Mapping[str, Any]):
    """One vector per patch, [B, N, D], after the final LayerNorm; images are checked first (see `check_images`)."""
    cfg = ViTConfig.from_config(cfg)
    check_images(images_BHWC, cfg)
    return _apply(params, jnp.asarray(images_BHWC), cfg)


def _apply(params: Params, images_BHWC, cfg: ViTConfig):
    x_BND = Stem(cfg).apply(
        {"params": {k: v for k, v in params.items() if k in ("patch", "pos_embedding")}}, images_BHWC
    )
    block = Block(cfg)
    for l in range(cfg.n_layers):
        x_BND = block.apply({"params": jax.tree.map(lambda a, l=l: a[l], params["layers"])}, x_BND)
    return LayerNorm(cfg).apply({"params": params["final_norm"]}, x_BND)


def flops_per_image(cfg: ViTConfig | Mapping[str, Any]) -> float:
    """Forward FLOPs of one image (2 per multiply-add; matmuls and attention scores/values); training is ~3x."""
    cfg = ViTConfig.from_config(cfg)
    N, D, F, K = cfg.num_patches, cfg.d_model, cfg.d_ff, cfg.patch_size**2 * cfg.channels
    per_layer = 2 * N * (4 * D * D + 2 * D * F) + 2 * 2 * N * N * D
    return float(2 * N * K * D + cfg.n_layers * per_layer)
