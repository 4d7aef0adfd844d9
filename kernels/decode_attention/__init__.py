"""Paged decode attention: Pallas kernels (GPU/Triton and TPU/Mosaic style, CPU-interpretable) and a jnp reference."""

from kernels.decode_attention.api import IMPLS, dense_as_pages, paged_attention
from kernels.decode_attention.reference import dequantize_kv, paged_attention_reference, quantize_kv

__all__ = ["IMPLS", "dense_as_pages", "dequantize_kv", "paged_attention", "paged_attention_reference", "quantize_kv"]
