"""The quantised-weight pytree and its round-to-nearest codecs (int8 per channel, int4/int3 group-wise, NF4).

Glossary: K input features (contracted), N output features, G group size, L stacked layers.

A `QuantizedWeight` stands for one 2-D matrix W [K, N] (x @ W) — the flattened kernel of a `lm.Linear` — or a
stack of them with leading [L] dims (every array field carries the same leading dims, so `nn.scan` slices it per
layer like any other parameter).  `lm.Linear` calls `weight.matmul(x_MK, dtype)`; nothing else in the model knows.

| fmt    | values                         | scales                | zeros          | W                            |
|--------|--------------------------------|-----------------------|----------------|------------------------------|
| "int8" | int8 [K, N]                    | fp32 [1, N]           | -              | q * s                        |
| "int4" | uint8 [K_pad/2, N] (2 per byte)| fp32 [K_pad/G, N]     | fp32 [K_pad/G] | (c - z) * s, c < 2**bits     |
| "nf4"  | uint8 [K_pad/2, N]             | fp32 [K_pad/64, N] *  | -              | NF4_LEVELS[c] * s            |

K_pad rounds K up to a multiple of 2G (the "halves" packing of `kernels.quantized_matmul.reference`).  bits=3 is
stored in the same nibbles (codes 0..7).  * NF4 with double quantisation keeps its block scales as int8 codes in
`scales`, dequantised as `scales * scale_scales[block of 256] + scale_offset` (QLoRA uses an 8-bit float for the
second level; this uses int8 absmax).  `in_scale` [1, K] (AWQ) multiplies activations before the matmul.
`act_quant` (W8A8, int8 only) quantises activations per token and runs the int8 x int8 -> int32 kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels import quantized_matmul as qmm

# QLoRA's NF4 codebook (normal-distribution quantiles scaled to [-1, 1], with an exact zero), as in bitsandbytes.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
FORMATS = ("int8", "int4", "nf4")
NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
_EPS = 1e-12


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantised [K, N] matrix (or [L, ..., K, N] stack); array fields are pytree children, the rest static."""

    values: jax.Array
    scales: jax.Array
    zeros: jax.Array | None = None
    scale_scales: jax.Array | None = None
    scale_offset: jax.Array | None = None
    in_scale: jax.Array | None = None
    fmt: str = dataclasses.field(default="int8", metadata=dict(static=True))
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    in_features: int = dataclasses.field(default=0, metadata=dict(static=True))
    impl: str = dataclasses.field(default="xla", metadata=dict(static=True))
    act_quant: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # The per-layer shape of the `lm.Linear` kernel this matrix was flattened from (`quant.quantize` records it, so
    # `quant.dequantize` restores the param tree's layout); () = the plain [K, N] matrix.
    kernel_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [..., K, N] of the matrix this stands for."""
        return (*self.values.shape[:-2], self.in_features, self.values.shape[-1])

    def block_scales(self) -> Float[Array, "... G N"]:
        """Group/channel scales in fp32 (undoing NF4's double quantisation)."""
        if self.scale_scales is None:
            return self.scales.astype(jnp.float32)
        return _undo_double_quant(self.scales, self.scale_scales, self.scale_offset)

    def dequantize(self) -> Float[Array, "... K N"]:
        """The fp32 matrix [..., K, N] this weight represents (AWQ's in_scale folded in)."""
        lead = self.values.shape[:-2]
        if lead:
            flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[len(lead) :]), self)
            return jax.vmap(QuantizedWeight.dequantize)(flat).reshape(*lead, self.in_features, -1)
        s = self.block_scales()
        if self.fmt == "int8":
            w = qmm.dequantize_int8(self.values, s)
        else:
            cb = NF4_LEVELS if self.fmt == "nf4" else None
            w = qmm.dequantize_int4(self.values, s, self.zeros, cb, group_size=self.group_size)[: self.in_features]
        if self.in_scale is not None:
            w = w * self.in_scale.reshape(-1, 1)
        return w

    def dequantize_kernel(self) -> Float[Array, ...]:
        """`dequantize` reshaped to the `lm.Linear` kernel it came from ([..., *kernel_shape]; [..., K, N] if unknown)."""
        w = self.dequantize()
        if not self.kernel_shape:
            return w
        return w.reshape(*self.values.shape[:-2], *self.kernel_shape)

    def matmul(self, x_MK: Float[Array, "M K"], dtype=None) -> Float[Array, "M N"]:
        """x @ W on one (unstacked) matrix, through the kernel picked by `impl`; output in `dtype` (x's by default)."""
        if self.values.ndim != 2:
            raise ValueError(f"QuantizedWeight.matmul needs one [K, N] matrix; this one is stacked: {self.shape}")
        dtype = dtype or x_MK.dtype
        x = x_MK.astype(dtype)
        if self.in_scale is not None:
            x = (x.astype(jnp.float32) * self.in_scale).astype(dtype)
        if self.fmt == "int8" and self.act_quant:
            sx_M1 = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True), _EPS) / 127.0
            xq = jnp.clip(jnp.round(x.astype(jnp.float32) / sx_M1), -127, 127).astype(jnp.int8)
            acc = qmm.int8_int8_matmul(xq, self.values, impl=self.impl)
            return (acc.astype(jnp.float32) * sx_M1 * self.scales).astype(dtype)
        if self.fmt == "int8":
            return qmm.int8_matmul(x, self.values, self.scales, impl=self.impl)
        cb = NF4_LEVELS if self.fmt == "nf4" else None
        return qmm.int4_matmul(
            x, self.values, self.block_scales(), self.zeros, group_size=self.group_size, codebook=cb, impl=self.impl
        )

    def storage_bytes(self) -> int:
        """Bytes of every array held (packed codes, scales, zeros, ...)."""
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self))

    def ideal_bytes(self) -> float:
        """Bytes at the nominal bit width (3-bit codes counted as 3 bits, not their 4-bit nibbles) plus metadata."""
        n = math.prod(self.shape)
        meta = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self) if a is not self.values)
        return n * self.bits / 8 + meta

    def with_impl(self, impl: str) -> QuantizedWeight:
        if impl not in qmm.IMPLS:
            raise ValueError(f"impl={impl!r}: expected one of {qmm.IMPLS}")
        return dataclasses.replace(self, impl=impl)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_rows(w_KN, rows: int):
    return jnp.pad(w_KN, ((0, rows - w_KN.shape[0]), (0, 0)))


# ------------------------------------------------------------------------------------------- group codecs
def group_params(w_GN, fmt: str, bits: int):
    """Round-to-nearest parameters of one group [G, N] (all rows share them): (scale [1, N], zero [1, N] | None)."""
    w = w_GN.astype(jnp.float32)
    if fmt == "int8":
        return jnp.maximum(jnp.max(jnp.abs(w), axis=0, keepdims=True), _EPS) / 127.0, None
    if fmt == "nf4":
        return jnp.maximum(jnp.max(jnp.abs(w), axis=0, keepdims=True), _EPS), None
    qmax = 2**bits - 1
    lo = jnp.minimum(jnp.min(w, axis=0, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(w, axis=0, keepdims=True), 0.0)
    scale = jnp.maximum(hi - lo, _EPS) / qmax
    return scale, jnp.round(-lo / scale)


def encode(w, scale, zero, fmt: str, bits: int):
    """Codes of w under (scale, zero) — broadcasting — for `fmt`; int8 codes are int8, the others uint8."""
    w = w.astype(jnp.float32)
    if fmt == "int8":
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    if fmt == "nf4":
        levels = jnp.asarray(NF4_LEVELS, jnp.float32)
        return jnp.argmin(jnp.abs((w / scale)[..., None] - levels), axis=-1).astype(jnp.uint8)
    return jnp.clip(jnp.round(w / scale) + zero, 0, 2**bits - 1).astype(jnp.uint8)


def decode(codes, scale, zero, fmt: str):
    """Inverse of `encode` (fp32)."""
    if fmt == "int8":
        return codes.astype(jnp.float32) * scale
    if fmt == "nf4":
        return jnp.asarray(NF4_LEVELS, jnp.float32)[codes.astype(jnp.int32)] * scale
    return (codes.astype(jnp.float32) - zero) * scale


def padded_rows(K: int, fmt: str, group_size: int) -> int:
    return K if fmt == "int8" else _round_up(K, 2 * group_size)


def from_codes(
    codes_KN,
    scales,
    zeros,
    *,
    fmt: str,
    bits: int,
    group_size: int,
    in_features: int,
    double_quant: bool = False,
    in_scale=None,
    impl: str = "xla",
    act_quant: bool = False,
):
    """Assembles a QuantizedWeight from codes [K or K_pad, N] and per-group (scales, zeros) [n_groups, N]."""
    values = codes_KN.astype(jnp.int8) if fmt == "int8" else qmm.pack_int4(codes_KN)
    scale_scales = scale_offset = None
    if double_quant:
        scales, scale_scales, scale_offset = _double_quant(scales)
    return QuantizedWeight(
        values=values,
        scales=scales,
        zeros=zeros,
        scale_scales=scale_scales,
        scale_offset=scale_offset,
        in_scale=in_scale,
        fmt=fmt,
        bits=bits,
        group_size=group_size,
        in_features=in_features,
        impl=impl,
        act_quant=act_quant,
    )


def quantize_matrix(
    w_KN: Float[Array, "K N"],
    fmt: str,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    double_quant: bool = False,
    impl: str = "xla",
    act_quant: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest quantisation of one [K, N] matrix (int8 per channel, int4/int3 group-wise, NF4 blocks)."""
    fmt, bits, group_size = check_format(fmt, bits, group_size, double_quant, act_quant)
    return _quantize_matrix(jnp.asarray(w_KN), fmt, bits, group_size, double_quant, impl, act_quant)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _quantize_matrix(w_KN, fmt: str, bits: int, group_size: int, double_quant: bool, impl: str, act_quant: bool):
    K, N = w_KN.shape
    if fmt == "int8":
        scale, _ = group_params(w_KN, fmt, bits)
        return from_codes(
            encode(w_KN, scale, None, fmt, bits),
            scale,
            None,
            fmt=fmt,
            bits=bits,
            group_size=0,
            in_features=K,
            impl=impl,
            act_quant=act_quant,
        )
    K_pad = padded_rows(K, fmt, group_size)
    w_gGN = _pad_rows(w_KN.astype(jnp.float32), K_pad).reshape(K_pad // group_size, group_size, N)
    scale_g1N, zero_g1N = jax.vmap(lambda g: group_params(g, fmt, bits))(w_gGN)
    codes = encode(w_gGN, scale_g1N, zero_g1N, fmt, bits).reshape(K_pad, N)
    zeros = None if zero_g1N is None else zero_g1N[:, 0, :]
    return from_codes(
        codes,
        scale_g1N[:, 0, :],
        zeros,
        fmt=fmt,
        bits=bits,
        group_size=group_size,
        in_features=K,
        double_quant=double_quant,
        impl=impl,
    )


def check_format(fmt: str, bits: int | None, group_size: int | None, double_quant: bool, act_quant: bool = False):
    """Validates a format spec, filling defaults: returns (fmt, bits, group_size)."""
    if fmt not in FORMATS:
        raise ValueError(f"quantisation format {fmt!r}: expected one of {FORMATS}")
    default_bits = {"int8": 8, "int4": 4, "nf4": 4}[fmt]
    bits = default_bits if bits is None else int(bits)
    if fmt == "int4" and bits not in (2, 3, 4):
        raise ValueError(f"int4 format stores 2..4-bit codes; got bits={bits}")
    if fmt != "int4" and bits != default_bits:
        raise ValueError(f"format {fmt!r} is {default_bits}-bit; got bits={bits}")
    if fmt == "int8":
        group_size = 0
    elif fmt == "nf4":
        group_size = NF4_BLOCK if group_size is None else int(group_size)
    else:
        group_size = 128 if group_size is None else int(group_size)
    if fmt != "int8" and group_size <= 0:
        raise ValueError(f"group_size must be positive for {fmt!r}; got {group_size}")
    if double_quant and fmt != "nf4":
        raise ValueError(f"double quantisation applies to NF4 block scales; got format {fmt!r}")
    if act_quant and fmt != "int8":
        raise ValueError(f"act_quant (W8A8) needs format 'int8'; got {fmt!r}")
    return fmt, bits, group_size


# ------------------------------------------------------------------------------------ double quantisation
def _double_quant(scales_GN):
    """fp32 block scales -> (int8 codes [G, N], fp32 absmax per 256 scales [nb], fp32 mean offset [1])."""
    G, N = scales_GN.shape
    offset = jnp.mean(scales_GN)
    flat = (scales_GN - offset).reshape(-1)
    nb = -(-flat.size // DOUBLE_QUANT_BLOCK)
    blocks = jnp.pad(flat, (0, nb * DOUBLE_QUANT_BLOCK - flat.size)).reshape(nb, DOUBLE_QUANT_BLOCK)
    ss = jnp.maximum(jnp.max(jnp.abs(blocks), axis=1), _EPS) / 127.0
    codes = jnp.clip(jnp.round(blocks / ss[:, None]), -127, 127).astype(jnp.int8)
    return codes.reshape(-1)[: G * N].reshape(G, N), ss, offset.reshape(1)


def _undo_double_quant(codes_GN, ss, offset):
    G, N = codes_GN.shape[-2:]
    nb = ss.shape[-1]
    flat = jnp.pad(codes_GN.reshape(-1), (0, nb * DOUBLE_QUANT_BLOCK - G * N)).astype(jnp.float32)
    deq = flat.reshape(nb, DOUBLE_QUANT_BLOCK) * ss[:, None]
    return deq.reshape(-1)[: G * N].reshape(G, N) + offset[0]


def stack(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Stacks per-layer QuantizedWeights (same format/static fields) on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *weights)
