"""Quantised matmuls (weight-only int8 / int4 / NF4, int8 x int8 -> int32): Pallas kernels beside jnp references."""

from kernels.quantized_matmul.api import IMPLS, BlockSizes, int4_matmul, int8_int8_matmul, int8_matmul
from kernels.quantized_matmul.reference import dequantize_int4, dequantize_int8, pack_int4, unpack_int4

__all__ = [
    "IMPLS",
    "BlockSizes",
    "dequantize_int4",
    "dequantize_int8",
    "int4_matmul",
    "int8_int8_matmul",
    "int8_matmul",
    "pack_int4",
    "unpack_int4",
]
