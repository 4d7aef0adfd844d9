"""Pallas kernels inside the scanned layers (`scan_layers=True`, flax `nn.scan`).

Flax traces the scan body once with no outputs and rejects any equation that survives dead-code elimination. JAX
0.11 (the GPU stack) keeps an unused `pallas_call`, so before `kernels.dce.droppable` every decode and quantised
matmul kernel failed there with "broadcasted variable has a data dependency on the scan body". JAX 0.12 (CI) drops
the bare call, so these traces pass there either way; run this file under JAX 0.11 to check the wrapper. TPU
interpret mode is different on every JAX: its io callbacks are effects that nn.scan cannot drop, so the model
names that limit instead of failing inside flax.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from framework import quant
from framework.inference import kv_cache
from framework.models import lm


@pytest.fixture(scope="module")
def scanned():
    cfg = lm.LMConfig(
        vocab_size=24, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, scan_layers=True
    )
    return cfg, lm.init(cfg, jax.random.key(0))


def _trace_decode_step(cfg, params, cache):
    tok, pos = jnp.ones((2, 1), jnp.int32), jnp.full((2, 1), 3, jnp.int32)
    return jax.make_jaxpr(lambda p, c: lm.forward(p, tok, cfg, positions_BT=pos, kv_cache=c).logits)(params, cache)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_decode_kernel_traces_inside_the_layer_scan(scanned, dtype):
    cfg, params = scanned
    cfg = dataclasses.replace(cfg, attention_impl="interpret")
    jaxpr = _trace_decode_step(cfg, params, kv_cache.init_cache(cfg, 2, 16, dtype))
    assert "pallas_call" in str(jaxpr)  # the kernel really is in the step


def _quantised(scanned, fmt, impl):
    cfg, params = scanned
    return quant.quantize(params, quant.QuantConfig(fmt=fmt, group_size=32, impl=impl), "rtn", model_cfg=cfg)


def _trace_forward(cfg, params):
    return jax.make_jaxpr(lambda p: lm.forward(p, jnp.ones((2, 8), jnp.int32), cfg).logits)(params)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quantised_matmul_kernels_trace_inside_the_layer_scan(scanned, fmt):
    assert "pallas_call" in str(_trace_forward(scanned[0], _quantised(scanned, fmt, "interpret")))


def test_tpu_interpret_kernels_name_the_scan_limit_and_run_unscanned(scanned):
    """TPU interpret mode runs through io callbacks, which nn.scan rejects on every JAX: a clear error, and the
    unrolled layer loop (scan_layers=False) runs the same weights."""
    cfg, _ = scanned
    qparams = _quantised(scanned, "int4", "interpret_tpu")
    with pytest.raises(ValueError, match=r"impl='interpret_tpu'.*model.scan_layers=False"):
        _trace_forward(cfg, qparams)
    assert "pallas_call" in str(_trace_forward(dataclasses.replace(cfg, scan_layers=False), qparams))
