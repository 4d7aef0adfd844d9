"""Pure-jnp reference attention: materialises the [T, S] scores, fp32 softmax, fully masked rows return 0.

Dimension letters: B batch, T query length, S key length, H query heads, K kv heads, G = H // K, D head dim.

Masking semantics shared with the Pallas kernels (`mask_TS` below is the single source of truth):
- Query row i sits at absolute position ``i + (S - T)`` (bottom-right alignment, as in FlashAttention >= 2.1 and a
  KV-cache prefill); for T == S that is position i.
- ``causal``: key j is visible iff ``j <= pos(i)``.
- ``window`` (requires causal): additionally ``j > pos(i) - window``, i.e. the ``window`` most recent keys including
  the query's own position.
- ``segment_ids``: a pair ``(q_seg [B, T], kv_seg [B, S])``; key j is visible iff the segment ids are equal.
- ``prefix_len`` [B] (requires causal): a prefix-LM mask. Causality widens to ``j <= pos(i) or (pos(i) < P and
  j < P)`` with P the row's prefix length: the first P positions see each other both ways (PaliGemma). The window
  still bounds keys behind the query, not prefix keys ahead of it; segments still apply.
"""

import jax
import jax.numpy as jnp


def mask_TS(T: int, S: int, *, causal: bool, window: int | None, prefix_len=None) -> jax.Array | None:
    """Boolean [T, S] visibility mask from causality, window and a prefix length P (a scalar, or [B, 1, 1] for a
    [B, T, S] mask); None when everything is visible."""
    if not causal:
        return None
    pos_T = jnp.arange(T)[:, None] + (S - T)
    key_S = jnp.arange(S)[None, :]
    visible_TS = key_S <= pos_T
    if prefix_len is not None:
        visible_TS = visible_TS | ((pos_T < prefix_len) & (key_S < prefix_len))
    if window is not None:
        visible_TS = visible_TS & (key_S > pos_T - window)
    return visible_TS


def attention_reference(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    causal: bool = True,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sm_scale: float | None = None,
    prefix_len: jax.Array | None = None,
) -> jax.Array:
    """Reference attention in fp32 (output in the input dtype); rows with no visible key are 0."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    q_BTKGD = q_BTHD.astype(jnp.float32).reshape(B, T, K, G, D)
    k_BSKD32, v_BSKD32 = k_BSKD.astype(jnp.float32), v_BSKD.astype(jnp.float32)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD32, precision="highest") * sm_scale
    if softcap is not None:
        s_BKGTS = softcap * jnp.tanh(s_BKGTS / softcap)
    visible_BTS = jnp.ones((B, T, S), bool)
    prefix_B11 = None if prefix_len is None else prefix_len[:, None, None]
    visible_TS = mask_TS(T, S, causal=causal, window=window, prefix_len=prefix_B11)  # [B, T, S] with a prefix
    if visible_TS is not None:
        visible_BTS = visible_BTS & visible_TS
    if segment_ids is not None:
        q_seg_BT, kv_seg_BS = segment_ids
        visible_BTS = visible_BTS & (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])
    visible_B11TS = visible_BTS[:, None, None]
    s_BKGTS = jnp.where(visible_B11TS, s_BKGTS, -jnp.inf)
    m_BKGT1 = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    m_BKGT1 = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m_BKGT1), m_BKGT1, 0.0))  # fully masked rows: 0, not NaN
    p_BKGTS = jnp.where(visible_B11TS, jnp.exp(s_BKGTS - m_BKGT1), 0.0)
    l_BKGT1 = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = p_BKGTS / jnp.where(l_BKGT1 == 0.0, 1.0, l_BKGT1)
    o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS, v_BSKD32, precision="highest")
    return o_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)
