"""Quantised matmuls as Pallas kernels in the TPU (Mosaic) style; tested in TPU interpret mode.

Dimension letters: M rows of x, K input features, N output features, G group size, P = K_pad / 2 packed rows.
Block letters: bm rows of x, bn output columns, bk contracted features per step.

Unlike `gpu.py` (one program per output tile with an in-kernel K loop), the contraction is the innermost,
"arbitrary" grid axis: each step DMAs one weight block into VMEM, dequantises it and adds its product into an
fp32 (int32) VMEM accumulator, zeroed at the first step and written out at the last.  The int4 step is one packed
block of G rows = two groups (low nibbles: group g, high nibbles: group g + P/G); x is passed twice, once per
half, so both of its column blocks arrive by BlockSpec.  Group scales/zeros are laid out [nG, 1, N] so that a
block's last two dims, (1, bn), are legal Mosaic tiles.  NOT yet run on a TPU (interpret mode only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.dce import droppable
from kernels.quantized_matmul.gpu import dequant_group, dot


def _interpret(interpret: bool):
    return pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan") if interpret else False


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _accumulate(acc_ref, value):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    acc_ref[...] += value


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref):
    x = x_ref[...]
    _accumulate(acc_ref, dot(x, w_ref[...].astype(x.dtype)))

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = (acc_ref[...] * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@droppable("bm", "bn", "bk", "interpret")
def int8_matmul(x_MK, q_KN, s_1N, *, bm: int, bn: int, bk: int, interpret: bool):
    """Weight-only int8 on padded inputs; grid (M/bm, N/bn, K/bk)."""
    M, K = x_MK.shape
    N = q_KN.shape[1]
    return pl.pallas_call(
        _int8_kernel,
        grid=(M // bm, N // bn, K // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((1, bn), lambda i, j, k: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), x_MK.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=_params(),
        interpret=_interpret(interpret),
        name="int8_weight_matmul_tpu",
    )(x_MK, q_KN, s_1N)


def _int4_kernel(x_lo_ref, x_hi_ref, w_ref, s_lo_ref, s_hi_ref, *rest, codebook, has_zeros: bool):
    if has_zeros:
        z_lo_ref, z_hi_ref, o_ref, acc_ref = rest
    else:
        (o_ref, acc_ref), z_lo_ref, z_hi_ref = rest, None, None
    packed = w_ref[...]
    total = None
    for codes, x_ref, s_ref, z_ref in (
        (packed & 0xF, x_lo_ref, s_lo_ref, z_lo_ref),
        (packed >> 4, x_hi_ref, s_hi_ref, z_hi_ref),
    ):
        x = x_ref[...]
        w = dequant_group(codes, None if z_ref is None else z_ref[...], codebook, x.dtype)
        part = dot(x, w) * s_ref[...].astype(jnp.float32)
        total = part if total is None else total + part
    _accumulate(acc_ref, total)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@droppable("group", "codebook", "bm", "bn", "interpret")
def int4_matmul(x_MK, packed_PN, s_GN, z_GN, *, group: int, codebook, bm: int, bn: int, interpret: bool):
    """Weight-only int4 on padded inputs; grid (M/bm, N/bn, P/G), one packed block (two groups) per step."""
    M, K = x_MK.shape
    P, N = packed_PN.shape
    nh = P // group
    s_G1N = s_GN[:, None, :]
    x_lo = pl.BlockSpec((bm, group), lambda i, j, g: (i, g))
    x_hi = pl.BlockSpec((bm, group), lambda i, j, g: (i, g + nh))
    g_lo = pl.BlockSpec((None, 1, bn), lambda i, j, g: (g, 0, j))
    g_hi = pl.BlockSpec((None, 1, bn), lambda i, j, g: (g + nh, 0, j))
    specs = [x_lo, x_hi, pl.BlockSpec((group, bn), lambda i, j, g: (g, j)), g_lo, g_hi]
    args = [x_MK, x_MK, packed_PN, s_G1N, s_G1N]
    if z_GN is not None:
        specs += [g_lo, g_hi]
        args += [z_GN[:, None, :]] * 2
    return pl.pallas_call(
        functools.partial(_int4_kernel, codebook=codebook, has_zeros=z_GN is not None),
        grid=(M // bm, N // bn, nh),
        in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, g: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), x_MK.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=_params(),
        interpret=_interpret(interpret),
        name="int4_weight_matmul_tpu",
    )(*args)


def _int8_int8_kernel(x_ref, w_ref, o_ref, acc_ref):
    _accumulate(acc_ref, dot(x_ref[...], w_ref[...], jnp.int32))

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = acc_ref[...]


@droppable("bm", "bn", "bk", "interpret")
def int8_int8_matmul(x_MK, w_KN, *, bm: int, bn: int, bk: int, interpret: bool):
    """int8 x int8 -> int32 on padded inputs; grid (M/bm, N/bn, K/bk)."""
    M, K = x_MK.shape
    N = w_KN.shape[1]
    return pl.pallas_call(
        _int8_int8_kernel,
        grid=(M // bm, N // bn, K // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)), pl.BlockSpec((bk, bn), lambda i, j, k: (k, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, N), jnp.int32),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
        compiler_params=_params(),
        interpret=_interpret(interpret),
        name="int8_int8_matmul_tpu",
    )(x_MK, w_KN)
