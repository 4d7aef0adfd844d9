"""Flash attention: Pallas kernels (GPU/Triton style, CPU-interpretable) beside a pure-jnp reference."""

from kernels.flash_attention.api import IMPLS, BlockSizes, flash_attention
from kernels.flash_attention.reference import attention_reference

__all__ = ["IMPLS", "BlockSizes", "attention_reference", "flash_attention"]
