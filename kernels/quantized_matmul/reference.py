"""Pure-jnp references of the quantised matmuls, and the packed int4 layout they share with the kernels.

Dimension letters: M rows of x (tokens), K input features (contracted), N output features, G group size,
P = K_pad / 2 packed rows.

Layouts of a weight W [K, N] (x @ W):
- int8 per channel: q int8 [K, N], scales [1, N]; W = q * scales.
- int4 group-wise ("halves" packing): codes c in 0..15 for K_pad rows (K padded with zero rows to a multiple of
  2 * G), packed uint8 [P, N] with row r in the low nibble and row r + P in the high nibble, so a kernel that loads
  packed rows [r0, r0 + G) gets two whole groups (r0 // G and (r0 + P) // G) without interleaving.
  Affine: W = (c - zeros) * scales; codebook (NF4): W = codebook[c] * scales; scales, zeros [K_pad / G, N].
- int8 x int8 -> int32: plain integer matmul (W8A8 activations and weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer


def pack_int4(codes_KN: Integer[Array, "K N"]) -> Integer[Array, "P N"]:
    """Packs 4-bit codes [K_pad, N] (K_pad even) into uint8 [K_pad/2, N]: low nibble row r, high nibble row r + P."""
    K = codes_KN.shape[0]
    if K % 2:
        raise ValueError(f"pack_int4 needs an even number of rows, got {K}")
    c = codes_KN.astype(jnp.uint8)
    return (c[: K // 2] & 0xF) | ((c[K // 2 :] & 0xF) << 4)


def unpack_int4(packed_PN: Integer[Array, "P N"]) -> Integer[Array, "K N"]:
    """Inverse of `pack_int4`: uint8 [P, N] -> codes uint8 [2P, N]."""
    p = packed_PN.astype(jnp.uint8)
    return jnp.concatenate([p & 0xF, p >> 4], axis=0)


def dequantize_int8(q_KN, scales_1N) -> Float[Array, "K N"]:
    """int8 per-channel weight -> fp32."""
    return q_KN.astype(jnp.float32) * scales_1N.astype(jnp.float32)


def dequantize_int4(packed_PN, scales_GN, zeros_GN=None, codebook=None, *, group_size: int) -> Float[Array, "K N"]:
    """Packed int4 (affine with `zeros`, symmetric without, or `codebook` levels) -> fp32 [K_pad, N]."""
    codes = unpack_int4(packed_PN)
    if codebook is not None:
        w = jnp.asarray(codebook, jnp.float32)[codes.astype(jnp.int32)]
    else:
        w = codes.astype(jnp.float32)
        if zeros_GN is not None:
            w = w - jnp.repeat(zeros_GN.astype(jnp.float32), group_size, axis=0)
    return w * jnp.repeat(scales_GN.astype(jnp.float32), group_size, axis=0)


def int8_matmul_reference(x_MK, q_KN, scales_1N, out_dtype=None) -> Float[Array, "M N"]:
    """x @ (q * scales) with fp32 accumulation."""
    y = jnp.dot(x_MK.astype(jnp.float32), q_KN.astype(jnp.float32), preferred_element_type=jnp.float32)
    return (y * scales_1N.astype(jnp.float32)).astype(out_dtype or x_MK.dtype)


def int4_matmul_reference(
    x_MK, packed_PN, scales_GN, zeros_GN=None, codebook=None, *, group_size: int, out_dtype=None
) -> Float[Array, "M N"]:
    """x @ dequantize_int4(...) with fp32 accumulation; x may have K <= K_pad columns (padded with zeros)."""
    w = dequantize_int4(packed_PN, scales_GN, zeros_GN, codebook, group_size=group_size)
    x = jnp.pad(x_MK.astype(jnp.float32), ((0, 0), (0, w.shape[0] - x_MK.shape[1])))
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype or x_MK.dtype)


def int8_int8_matmul_reference(x_MK, w_KN) -> Integer[Array, "M N"]:
    """int8 x int8 -> int32 (exact)."""
    return jax.lax.dot(x_MK.astype(jnp.int8), w_KN.astype(jnp.int8), preferred_element_type=jnp.int32)
