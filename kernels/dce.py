"""`droppable`: the jit wrapper every function that calls `pl.pallas_call` carries.

JAX 0.11's `pallas_call` keeps itself in dead-code elimination even when nothing reads its outputs. Flax's
`nn.scan` (the model's `scan_layers=True`) traces its body once with no outputs and rejects any equation that
survives DCE with "broadcasted variable has a data dependency on the scan body", so on the JAX 0.11 GPU stack every
Pallas decode or quantised-matmul call inside the scanned layers failed. A `jax.jit` around the call is dropped as a
whole when unused (JAX 0.12 drops the bare call too). Inside an outer jit the nested one is inlined: no run-time cost.
"""

from __future__ import annotations

import functools

import jax


def droppable(*static_argnames: str):
    """`jax.jit` with `static_argnames`, for the functions that call `pl.pallas_call` (see the module docstring)."""
    return functools.partial(jax.jit, static_argnames=static_argnames)
