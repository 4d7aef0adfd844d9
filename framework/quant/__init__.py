"""Quantised weights (int8 / int4 / NF4 pytrees that lm.Linear runs directly), post-training methods, and
`dequantize(params)` back to float params of the same layout."""

from framework.quant.methods import (
    DEFAULT_TARGETS,
    METHODS,
    QuantConfig,
    dequantize,
    quantize,
    quantize_linear,
    weight_bytes,
)
from framework.quant.qtensor import FORMATS, NF4_LEVELS, QuantizedWeight, quantize_matrix

__all__ = [
    "DEFAULT_TARGETS",
    "FORMATS",
    "METHODS",
    "NF4_LEVELS",
    "QuantConfig",
    "QuantizedWeight",
    "dequantize",
    "quantize",
    "quantize_linear",
    "quantize_matrix",
    "weight_bytes",
]
