"""Kernel configuration and the online-softmax page update shared by the GPU- and TPU-style decode kernels."""

import dataclasses

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": exp(NEG - m) is exactly 0 and never produces NaN


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    sm_scale: float
    softcap: float | None
    page_size: int
    pages_per_seq: int
    quantized: bool
    interpret: bool
    window: int | None = None  # sliding window: only the `window` most recent positions are visible


def dequant(x_CD, scale_C):
    """A page's [C, D] keys or values in fp32 (int8 pages times their per-token scales)."""
    x = x_CD.astype(jnp.float32)
    return x if scale_C is None else x * scale_C[:, None]


def page_update(q_GD, k_CD, v_CD, first_pos, length, m_G1, l_G1, acc_GD, cfg: DecodeConfig, *, use_dot: bool):
    """Folds one page (positions first_pos .. first_pos + C - 1, visible below `length`) into the softmax state.

    `use_dot=False` forms scores as a broadcast multiply-reduce over D, which keeps tiny G (heads per kv head) off the
    matrix units' minimum tile sizes (Triton's dot needs 16 rows).
    """
    C = cfg.page_size
    if use_dot:
        s_GC = jax.lax.dot_general(q_GD, k_CD, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        s_GC = jnp.sum(q_GD[:, None, :] * k_CD[None, :, :], axis=-1)
    s_GC = s_GC * cfg.sm_scale
    if cfg.softcap is not None:
        s_GC = cfg.softcap * jnp.tanh(s_GC / cfg.softcap)
    pos_1C = first_pos + jax.lax.broadcasted_iota(jnp.int32, (1, C), 1)
    visible_1C = pos_1C < length
    if cfg.window is not None:
        visible_1C &= pos_1C >= length - cfg.window
    s_GC = jnp.where(visible_1C, s_GC, NEG)
    m_new = jnp.maximum(m_G1, jnp.max(s_GC, axis=-1, keepdims=True))
    p_GC = jnp.exp(s_GC - m_new)
    alpha = jnp.exp(m_G1 - m_new)
    l_new = alpha * l_G1 + jnp.sum(p_GC, axis=-1, keepdims=True)
    if use_dot:
        pv_GD = jax.lax.dot_general(p_GC, v_CD, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        pv_GD = jnp.sum(p_GC[:, :, None] * v_CD[None, :, :], axis=1)
    return m_new, l_new, alpha * acc_GD + pv_GD


def finish(l_G1, acc_GD):
    """acc / l; a sequence with no visible key (l == 0) gives zeros."""
    return acc_GD / jnp.where(l_G1 > 0, l_G1, 1.0)
