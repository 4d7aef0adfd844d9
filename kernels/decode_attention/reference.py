"""Pure-jnp reference for paged decode attention, and the int8 KV quantiser the kernels dequantise.

Dimension letters: B batch (sequences), H query heads, K kv heads, G = H // K, D head dim, P pages in the pool,
C page size (tokens per page), N pages per sequence (page-table width).

A sequence's keys live in pages `page_table[b, 0], page_table[b, 1], ...`: token position t sits in page
`page_table[b, t // C]` at slot `t % C`. Only the first `lengths[b]` positions are visible; page-table entries past
`ceil(lengths[b] / C)` are never read (their value is irrelevant).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Int8

INT8_MAX = 127.0


def quantize_kv(x_NKD: Float[Array, "... K D"]) -> tuple[Int8[Array, "... K D"], Float[Array, "... K"]]:
    """Symmetric int8 per (token, head): x ~= q * scale with scale = max|x| / 127 over the head dim (fp32)."""
    x = x_NKD.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_kv(q: Int8[Array, "... K D"], scale: Float[Array, "... K"], dtype=jnp.float32) -> jax.Array:
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def gather_pages(pages_PCKD: jax.Array, page_table_BN: Int[Array, "B N"]) -> jax.Array:
    """The contiguous [B, N*C, ...] view of each sequence's pages (entries out of range are clamped)."""
    P = pages_PCKD.shape[0]
    g = jnp.take(pages_PCKD, jnp.clip(page_table_BN, 0, P - 1), axis=0)  # [B, N, C, ...]
    return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])


def paged_attention_reference(
    q_BHD: Float[Array, "B H D"],
    k_pages_PCKD: jax.Array,
    v_pages_PCKD: jax.Array,
    page_table_BN: Int[Array, "B N"],
    lengths_B: Int[Array, " B"],
    *,
    k_scales_PCK: Float[Array, "P C K"] | None = None,
    v_scales_PCK: Float[Array, "P C K"] | None = None,
    sm_scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> Float[Array, "B H D"]:
    """One query token per sequence attending over its first `lengths[b]` cached keys; fp32 softmax.

    Materialises each sequence's [N*C] keys; a sequence of length 0 returns zeros. `window`: only the `window` most
    recent positions (lengths[b] - window .. lengths[b] - 1) are visible (sliding-window attention).
    """
    B, H, D = q_BHD.shape
    K = k_pages_PCKD.shape[2]
    k_BSKD = gather_pages(k_pages_PCKD, page_table_BN)
    v_BSKD = gather_pages(v_pages_PCKD, page_table_BN)
    if k_scales_PCK is not None:
        k_BSKD = dequantize_kv(k_BSKD, gather_pages(k_scales_PCK, page_table_BN))
        v_BSKD = dequantize_kv(v_BSKD, gather_pages(v_scales_PCK, page_table_BN))
    q_BKGD = q_BHD.reshape(B, K, H // K, D).astype(jnp.float32)
    s_BKGS = jnp.einsum("bkgd,bskd->bkgs", q_BKGD, k_BSKD.astype(jnp.float32)) * sm_scale
    if softcap is not None:
        s_BKGS = softcap * jnp.tanh(s_BKGS / softcap)
    visible_BS = jnp.arange(k_BSKD.shape[1])[None, :] < lengths_B[:, None]
    if window is not None:
        visible_BS &= jnp.arange(k_BSKD.shape[1])[None, :] >= lengths_B[:, None] - window
    s_BKGS = jnp.where(visible_BS[:, None, None, :], s_BKGS, -jnp.inf)
    m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
    p_BKGS = jnp.exp(s_BKGS - jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0))
    l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    o_BKGD = jnp.einsum("bkgs,bskd->bkgd", p_BKGS, v_BSKD.astype(jnp.float32)) / jnp.where(l_BKG1 > 0, l_BKG1, 1.0)
    return o_BKGD.reshape(B, H, D).astype(q_BHD.dtype)
