"""Attention entry point: one function, implementation picked by name.

Glossary: B batch, T query time, S key time, H query heads, K kv heads, G = H // K heads per kv head, D head dim.

`dot_product_attention` is the only place model code calls attention. `impl="xla"` is the pure-jnp reference
(grouped-query attention without materialising repeated K/V); kernels register further implementations
(`"pallas"`, `"cudnn"`, ...) through `register_impl`, so model code never branches on hardware.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from framework.models import invariant


class AttentionImpl(Protocol):
    def __call__(self, q_BTHD, k_BSKD, v_BSKD, *, mask_BTS, softcap, sm_scale) -> jax.Array: ...


_IMPLS: dict[str, AttentionImpl] = {}


def register_impl(name: str, fn: AttentionImpl) -> None:
    """Makes `fn` selectable as `model.attention_impl = name`."""
    _IMPLS[name] = fn


# Model `attention_impl` names served by the flash-attention kernels (kernels.flash_attention) on cache-free passes
# (training, scoring). They take the mask's structure, not a dense mask: causal by token order plus segment ids (and
# a prefix length per row), which equals the position mask whenever positions increase along each segment (always
# so for Lumen's batches).
# Passes over a KV cache are the cache's business (framework.inference.kv_cache: one-token steps go to the paged
# decode kernel, longer chunks to the dense-mask reference).
FLASH_IMPLS = ("pallas", "interpret", "cudnn", "splash")


def available_impls() -> tuple[str, ...]:
    """Names accepted as `model.attention_impl`: dense-mask implementations plus the flash-kernel ones."""
    return tuple(sorted(set(_IMPLS) | set(FLASH_IMPLS)))


def flash_self_attention(
    q_BTHD: Float[Array, "B T H D"],
    k_BTKD: Float[Array, "B T K D"],
    v_BTKD: Float[Array, "B T K D"],
    *,
    segment_ids_BT: Int[Array, "B T"] | None,
    impl: str,
    window: int | None = None,
    softcap: float | None = None,
    sm_scale: float | None = None,
    prefix_len_B: Int[Array, " B"] | None = None,
) -> Float[Array, "B T H D"]:
    """Causal (and segment-masked) self-attention through the Pallas flash kernels; `impl` from FLASH_IMPLS.

    `window`: each query sees its `window` most recent keys (itself included); `softcap`: scores become
    softcap * tanh(s / softcap); `sm_scale`: the score scale (default head_dim**-0.5); `prefix_len_B`: the prefix-LM
    mask of `make_mask` (token order as position), in the kernels' masking and block skipping.
    """
    from kernels import flash_attention  # kernels import only jax: the layering holds

    if impl not in FLASH_IMPLS:
        raise ValueError(f"flash attention impl {impl!r} is not one of {FLASH_IMPLS}")
    return flash_attention(
        q_BTHD,
        k_BTKD,
        v_BTKD,
        causal=True,
        segment_ids=segment_ids_BT,
        window=window,
        softcap=softcap,
        sm_scale=sm_scale,
        impl=impl,
        **({} if prefix_len_B is None else {"prefix_len": prefix_len_B}),
    )


def make_mask(
    q_pos_BT: Int[Array, "B T"],
    kv_pos_BS: Int[Array, "B S"],
    *,
    causal: bool = True,
    q_segment_BT: Int[Array, "B T"] | None = None,
    kv_segment_BS: Int[Array, "B S"] | None = None,
    window: int | None = None,
    prefix_len_B: Int[Array, " B"] | None = None,
) -> Bool[Array, "B T S"]:
    """Boolean [B, T, S] mask: True where query t may attend to key s.

    By positions p (query) and s (key): causal s <= p; `window` s > p - window; segments equal ids. `prefix_len_B`
    (needs causal) widens causality to a prefix-LM mask, s <= p or (p < prefix_len and s < prefix_len): the first
    prefix_len positions of a row see each other both ways. The window still applies to keys behind the query and not
    to prefix keys ahead of it (HF Gemma-2's combination), and segments still cut across everything.
    """
    mask = jnp.ones((q_pos_BT.shape[0], q_pos_BT.shape[1], kv_pos_BS.shape[1]), bool)
    delta_BTS = q_pos_BT[:, :, None] - kv_pos_BS[:, None, :]
    if prefix_len_B is not None:
        if not causal:
            raise ValueError("make_mask: prefix_len_B widens a causal mask; it needs causal=True")
        P_B11 = prefix_len_B[:, None, None]
        mask &= (delta_BTS >= 0) | ((q_pos_BT[:, :, None] < P_B11) & (kv_pos_BS[:, None, :] < P_B11))
    elif causal:
        mask &= delta_BTS >= 0
    if window is not None:
        mask &= delta_BTS < window
    if q_segment_BT is not None:
        mask &= q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]
    return mask


def grouped_attention(
    q_BTHD: Float[Array, "B T H D"],
    k_BKSD: Float[Array, "B K S D"],
    v_BKSD: Float[Array, "B K S D"],
    *,
    mask_BTS: Bool[Array, "B T S"],
    softcap: float | None,
    sm_scale: float,
) -> Float[Array, "B T H D"]:
    """Grouped-query attention over heads-major K/V ([B, K, S, D]); scores and softmax in fp32.

    The G = H // K query heads sharing a kv head are folded with time into one axis M = G*T, so both matmuls batch
    over (b, k) and contract a single axis, with S and D contiguous: no copy of K/V (a KV cache is read where it
    lies), and every gradient contracts one axis (XLA:CPU runs that form ~1.45x faster fwd+bwd than the
    [B, K, G, T, S] einsum). A row with no visible key gets a uniform average (callers that can have one zero it).
    """
    B, T, H, D = q_BTHD.shape
    K, S = k_BKSD.shape[1], k_BKSD.shape[2]
    G = H // K
    q_BKMD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
    s_BKMS = jnp.einsum("bkmd,bksd->bkms", q_BKMD, k_BKSD, preferred_element_type=jnp.float32) * sm_scale
    if softcap is not None:
        s_BKMS = softcap * jnp.tanh(s_BKMS / softcap)
    m_B1MS = jnp.broadcast_to(mask_BTS[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    s_BKMS = jnp.where(m_B1MS, s_BKMS, jnp.finfo(jnp.float32).min)
    p_BKMS = invariant.softmax(s_BKMS)  # batch-invariant: a decode step's row equals the cache-free pass's
    o_BKMD = jnp.einsum("bkms,bksd->bkmd", p_BKMS.astype(v_BKSD.dtype), v_BKSD)
    return o_BKMD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def xla_attention(q_BTHD, k_BSKD, v_BSKD, *, mask_BTS, softcap, sm_scale):
    """Reference attention in plain jnp (`grouped_attention` on token-major K/V); rows with no visible key return
    zeros."""
    k_BKSD, v_BKSD = k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)
    o_BTHD = grouped_attention(q_BTHD, k_BKSD, v_BKSD, mask_BTS=mask_BTS, softcap=softcap, sm_scale=sm_scale)
    # Zeroing the [B,T,H,D] output rather than the [B,H,T,S] probabilities keeps the cost off the quadratic tensor.
    visible_BT = jnp.any(mask_BTS, axis=-1)
    return jnp.where(visible_BT[:, :, None, None], o_BTHD, 0)


register_impl("xla", xla_attention)


def dot_product_attention(
    q_BTHD: Float[Array, "B T H D"],
    k_BSKD: Float[Array, "B S K D"],
    v_BSKD: Float[Array, "B S K D"],
    *,
    mask_BTS: Bool[Array, "B T S"],
    softcap: float | None = None,
    sm_scale: float | None = None,
    impl: str = "xla",
) -> Float[Array, "B T H D"]:
    """Grouped-query attention of q over (k, v) under a boolean mask, by the named implementation."""
    H, K = q_BTHD.shape[2], k_BSKD.shape[2]
    if H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
    if impl not in _IMPLS:
        raise ValueError(f"attention impl {impl!r} is not available; choose one of {tuple(sorted(_IMPLS))}")
    if sm_scale is None:
        sm_scale = q_BTHD.shape[-1] ** -0.5
    fn: Callable = _IMPLS[impl]
    return fn(q_BTHD, k_BSKD, v_BSKD, mask_BTS=mask_BTS, softcap=softcap, sm_scale=sm_scale)
