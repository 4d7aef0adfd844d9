"""The decoder's building blocks: parameter helpers, RMSNorm, RoPE, the `Linear` projection (the quantisation and
LoRA hook) and the short causal convolution; `framework.models.lm` assembles them (and re-exports them).

Glossary: B batch, T time, D model, H heads, Dh head dim, J convolution taps behind the current token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from framework.models import invariant
from framework.models.config import LMConfig


def _param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], init: Callable):
    init = nn.with_logical_partitioning(init, tuple(axes))
    return module.param(name, init, tuple(shape), module.cfg.params_dtype)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * scale in fp32. The mean is `invariant.pairwise_sum`: a token's output is bitwise the
    same whatever batch or sequence it is computed in (XLA's own reduction order depends on the array's size)."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, x_BTD):
        plus_one = self.cfg.norm_plus_one  # Gemma: y * (1 + scale), scale starting at 0
        init = nn.initializers.zeros if plus_one else nn.initializers.ones
        scale_D = _param(self, "scale", (x_BTD.shape[-1],), ("embed",), init).astype(jnp.float32)
        x32 = x_BTD.astype(jnp.float32)
        mean_sq = invariant.pairwise_sum(x32 * x32) / x32.shape[-1]
        y = x32 * jax.lax.rsqrt(mean_sq + self.cfg.norm_eps)
        return (y * (1.0 + scale_D if plus_one else scale_D)).astype(self.cfg.compute_dtype)


class Rope(NamedTuple):
    """Rotary tables for a block of positions; computed once per forward pass and shared by every layer."""

    cos: Float[Array, "B T 1 Dh"]
    sin: Float[Array, "B T 1 Dh"]  # rotate_half's sign folded in: -sin on the first half, +sin on the second


def rope_tables(pos_BT: jax.Array, head_dim: int, theta: float) -> Rope:
    """cos/sin of each position's angles, over the full head dim (split-halves convention, as HF Llama)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
    sign = jnp.concatenate([-jnp.ones(half, jnp.float32), jnp.ones(half, jnp.float32)])
    ang_BTD = pos_BT[..., None].astype(jnp.float32) * jnp.concatenate([inv_freq, inv_freq])
    # The barrier makes XLA compute the tables once; without it XLA fused the sin and cos into every rotation that
    # reads them (each layer's q and k), evaluating them again for every head.
    cos_BTD, sin_BTD = jax.lax.optimization_barrier((jnp.cos(ang_BTD), jnp.sin(ang_BTD) * sign))
    return Rope(cos_BTD[:, :, None, :], sin_BTD[:, :, None, :])


def apply_rope(x_BTHD: jax.Array, rope: Rope) -> jax.Array:
    """Rotary embedding in the split-halves (rotate_half) convention used by HF Llama.

    out = [x1 cos - x2 sin, x2 cos + x1 sin] is written as x * cos + swap_halves(x) * (sign * sin), every factor
    over the full head dim: no concatenate of results, so XLA fuses the whole rotation (forward and gradient) into
    one elementwise loop (4 -> 2 ops forward, 5 -> 2 with the gradient; the values are bitwise the same). The
    tables come from `rope_tables`, once per pass.
    """
    half = x_BTHD.shape[-1] // 2
    x = x_BTHD.astype(jnp.float32)
    swapped = x.reshape(*x.shape[:-1], 2, half)[..., ::-1, :].reshape(x.shape)  # [x2, x1]
    return (x * rope.cos + swapped * rope.sin).astype(x_BTHD.dtype)


class Linear(nn.Module):
    """A projection `einsum(eqn, x, kernel)` (+ `bias` if use_bias); one leaf `kernel` per layer (quant/LoRA hook).

    `eqn` must contract x's trailing dims with the kernel's leading ones (e.g. "btd,dhk->bthk", "bthk,hkd->btd").
    It runs as one 2-D matmul over flattened dims: XLA:CPU differentiates a dot that contracts batch and time
    together (the kernel gradient of the einsum form) far slower than the plain matmul (1.8x on the MLP).
    """

    cfg: LMConfig
    eqn: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    std: float
    use_bias: bool = False  # a float `bias` over the output dims (Qwen2's q/k/v), added after the matmul

    @nn.compact
    def __call__(self, x):
        # A quantised (framework.quant) or adapted (framework.peft) weight is a pytree with its own 2-D `matmul`;
        # it bypasses `param`, whose shape check compares the pytree's leaves with the plain kernel's shape.
        kernel = self.get_variable("params", "kernel")
        if not hasattr(kernel, "matmul"):
            kernel = _param(self, "kernel", self.shape, self.axes, _normal(self.std))
        x_subs, k_subs = self.eqn.split("->")[0].split(",")
        n_in = sum(c in x_subs for c in k_subs)
        if x_subs[len(x_subs) - n_in :] != k_subs[:n_in]:
            raise ValueError(f"Linear eqn {self.eqn!r}: x's trailing dims must be the kernel's leading dims")
        lead, d_in = x.shape[: x.ndim - n_in], math.prod(self.shape[:n_in])
        if hasattr(kernel, "matmul"):
            y = kernel.matmul(x.reshape(-1, d_in).astype(self.cfg.compute_dtype), self.cfg.compute_dtype)
        else:
            y = x.reshape(-1, d_in) @ kernel.astype(self.cfg.compute_dtype).reshape(d_in, -1)
        y = y.reshape(*lead, *self.shape[n_in:])
        if self.use_bias:
            bias = _param(self, "bias", self.shape[n_in:], self.axes[n_in:], nn.initializers.zeros)
            y = y + bias.astype(self.cfg.compute_dtype)
        return y


class ShortConv(nn.Module):
    """x_t + sum_j w_j * x_{t-j} (j = 0 .. taps - 1, per channel) over one sequence's tokens: `cfg.short_conv`.

    The weights start at zero (the block starts as a plain one). Without a cache, a tap reads the token j places
    back in the row only if it is the same sequence's position p - j (packed segments and padding read zeros). With
    a cache, the layer cache keeps every position's input (`layer_cache.conv_taps`, written at the chunk's positions
    like K/V), so prefill chunks and decode steps see the same taps as the cache-free pass.
    """

    cfg: LMConfig

    @nn.compact
    def __call__(self, x_BTD, pos_BT, seg_BT, layer_cache, page_table):
        c = self.cfg
        W = c.short_conv
        w_WD = _param(self, "taps", (W, c.d_model), (None, "embed"), nn.initializers.zeros).astype(c.compute_dtype)
        if layer_cache is not None:
            if getattr(layer_cache, "conv", None) is None:
                raise ValueError(
                    f"model.short_conv={W} needs a KV cache with its conv buffer: build it with "
                    "kv_cache.init_cache(cfg, ...) for this config"
                )
            taps_JBTD, layer_cache = layer_cache.conv_taps(x_BTD, pos_BT, page_table, W)
        else:
            taps = []
            for j in range(1, W):
                back = lambda a, fill, j=j: jnp.pad(a, ((0, 0), (j, 0)), constant_values=fill)[:, : a.shape[1]]
                ok_BT = back(pos_BT, -1) == pos_BT - j
                if seg_BT is not None:
                    ok_BT &= back(seg_BT, -1) == seg_BT
                x_j = jnp.pad(x_BTD, ((0, 0), (j, 0), (0, 0)))[:, : x_BTD.shape[1]]
                taps.append(jnp.where(ok_BT[..., None], x_j, 0))
            taps_JBTD = jnp.stack(taps)
        out_BTD = x_BTD * (1 + w_WD[0])
        for j in range(1, W):  # elementwise, so XLA fuses the taps into one pass (an einsum here is a batched dot)
            out_BTD = out_BTD + taps_JBTD[j - 1] * w_WD[j]
        return out_BTD.astype(x_BTD.dtype), layer_cache
