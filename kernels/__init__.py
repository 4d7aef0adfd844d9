"""Lumen's Pallas kernels and their pure-jnp references (imports only jax/numpy, never `framework`)."""

from kernels.flash_attention import BlockSizes, flash_attention

__all__ = ["BlockSizes", "flash_attention"]
