"""Quantised matmuls as Pallas kernels in the GPU (Triton) style; CPU-interpretable.

Dimension letters: M rows of x, K input features, N output features, G group size, P = K_pad / 2 packed rows.
Block letters: bm rows of x, bn output columns, bk contracted features per step.

Each program owns one (bm, bn) output tile: it keeps x's [bm, K] row block and the weight's [K, bn] column block
(int8, or packed uint8 [P, bn]) and loops over K in-kernel, dequantising each weight slice in registers and
accumulating x @ w in fp32 (int32 for int8 x int8).  Inputs arrive padded by `api.py` (M, N to block multiples,
K to the step).  Per-channel int8 scales multiply the finished accumulator; int4 group scales multiply each
group's partial product (the codes, or `c - zero`, are small integers, exact in bf16, so the dot sees no rounding
of the weight and the fp32 scale is applied once per [bm, bn] partial instead of once per weight element).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.dce import droppable


def dot(a, b, acc_dtype=jnp.float32):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc_dtype)


def lookup(codes, codebook: tuple[float, ...]):
    """codebook[codes] as a select chain (no gather: lowers on Triton and Mosaic alike); fp32."""
    out = jnp.zeros(codes.shape, jnp.float32)
    for i, level in enumerate(codebook):
        out = jnp.where(codes == i, jnp.float32(level), out)
    return out


def dequant_group(codes, zeros_1N, codebook, dtype):
    """Integer codes of one group -> the dot operand (c - zero, or codebook levels), before the group scale."""
    if codebook is not None:
        return lookup(codes, codebook).astype(dtype)
    w = codes.astype(jnp.float32)
    if zeros_1N is not None:
        w = w - zeros_1N
    return w.astype(dtype)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, bk: int, nk: int):
    bm, bn = o_ref.shape

    def body(k, acc):
        sl = pl.ds(k * bk, bk)
        x = x_ref[:, sl]
        return acc + dot(x, w_ref[sl, :].astype(x.dtype))

    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@droppable("bm", "bn", "bk", "interpret")
def int8_matmul(x_MK, q_KN, s_1N, *, bm: int, bn: int, bk: int, interpret: bool):
    """Weight-only int8: x [M, K] @ (q [K, N] * s [1, N]) on padded inputs; output dtype = x dtype."""
    M, K = x_MK.shape
    N = q_KN.shape[1]
    return pl.pallas_call(
        functools.partial(_int8_kernel, bk=bk, nk=K // bk),
        grid=(M // bm, N // bn),
        in_specs=[
            pl.BlockSpec((bm, K), lambda i, j: (i, 0)),
            pl.BlockSpec((K, bn), lambda i, j: (0, j)),
            pl.BlockSpec((1, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), x_MK.dtype),
        interpret=interpret,
        name="int8_weight_matmul",
    )(x_MK, q_KN, s_1N)


def _int4_kernel(x_ref, w_ref, s_ref, *rest, group: int, n_half: int, codebook, has_zeros: bool):
    z_ref, o_ref = (rest[0], rest[1]) if has_zeros else (None, rest[0])
    bm, bn = o_ref.shape
    P = n_half * group

    def body(g, acc):
        packed = w_ref[pl.ds(g * group, group), :]
        for half, codes in ((0, packed & 0xF), (1, packed >> 4)):
            gi = g + half * n_half
            x = x_ref[:, pl.ds(half * P + g * group, group)]
            zeros = z_ref[pl.ds(gi, 1), :] if has_zeros else None
            w = dequant_group(codes, zeros, codebook, x.dtype)
            acc = acc + dot(x, w) * s_ref[pl.ds(gi, 1), :].astype(jnp.float32)
        return acc

    acc = lax.fori_loop(0, n_half, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@droppable("group", "codebook", "bm", "bn", "interpret")
def int4_matmul(x_MK, packed_PN, s_GN, z_GN, *, group: int, codebook, bm: int, bn: int, interpret: bool):
    """Weight-only int4 (affine, symmetric or codebook) on padded inputs: x [M, K_pad], packed [K_pad/2, N]."""
    M, K = x_MK.shape
    P, N = packed_PN.shape
    nG = s_GN.shape[0]
    specs = [
        pl.BlockSpec((bm, K), lambda i, j: (i, 0)),
        pl.BlockSpec((P, bn), lambda i, j: (0, j)),
        pl.BlockSpec((nG, bn), lambda i, j: (0, j)),
    ]
    args = [x_MK, packed_PN, s_GN]
    if z_GN is not None:
        specs.append(pl.BlockSpec((nG, bn), lambda i, j: (0, j)))
        args.append(z_GN)
    kernel = functools.partial(
        _int4_kernel, group=group, n_half=P // group, codebook=codebook, has_zeros=z_GN is not None
    )
    return pl.pallas_call(
        kernel,
        grid=(M // bm, N // bn),
        in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), x_MK.dtype),
        interpret=interpret,
        name="int4_weight_matmul",
    )(*args)


def _int8_int8_kernel(x_ref, w_ref, o_ref, *, bk: int, nk: int):
    bm, bn = o_ref.shape

    def body(k, acc):
        sl = pl.ds(k * bk, bk)
        return acc + dot(x_ref[:, sl], w_ref[sl, :], jnp.int32)

    o_ref[...] = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.int32))


@droppable("bm", "bn", "bk", "interpret")
def int8_int8_matmul(x_MK, w_KN, *, bm: int, bn: int, bk: int, interpret: bool):
    """int8 [M, K] x int8 [K, N] -> int32 [M, N] on padded inputs."""
    M, K = x_MK.shape
    N = w_KN.shape[1]
    return pl.pallas_call(
        functools.partial(_int8_int8_kernel, bk=bk, nk=K // bk),
        grid=(M // bm, N // bn),
        in_specs=[pl.BlockSpec((bm, K), lambda i, j: (i, 0)), pl.BlockSpec((K, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), jnp.int32),
        interpret=interpret,
        name="int8_int8_matmul",
    )(x_MK, w_KN)
