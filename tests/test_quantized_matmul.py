"""Quantised matmuls: the Pallas kernels (GPU style via interpret=True, TPU style via pltpu.InterpretParams) against
the pure-jnp references, on awkward (padded) and decode-shaped sizes; packing exactness; wrapper validation.

Dimension letters: M rows of x, K input features, N output features, G group size, P = K_pad / 2.
Tolerances (max-abs relative to max |reference|): fp32 1e-5 (accumulation order only); bf16 x 1e-2 (the output is
rounded to bf16, half-ulp 2^-9, and the products are exact: the dot operand is an integer code exact in bf16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import quantized_matmul as qmm
from kernels.quantized_matmul import reference

KERNEL_IMPLS = ("interpret", "interpret_tpu")
NF4_LIKE = tuple(float(v) for v in np.linspace(-1.0, 1.0, 16))
FP32_TOL, BF16_TOL = 1e-5, 1e-2


def _rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(y - ref)) / max(1.0, np.max(np.abs(ref))))


def _int8_inputs(M, K, N, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (M, K), jnp.float32)
    q = jax.random.randint(k[1], (K, N), -127, 128).astype(jnp.int8)
    s = jax.random.uniform(k[2], (1, N), minval=0.001, maxval=0.02)
    return x, q, s


def _int4_inputs(M, K_pad, N, G, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (M, K_pad), jnp.float32)
    codes = jax.random.randint(k[1], (K_pad, N), 0, 16)
    s = jax.random.uniform(k[2], (K_pad // G, N), minval=0.01, maxval=0.1)
    z = jnp.round(jax.random.uniform(k[3], (K_pad // G, N), maxval=15.0))
    return x, reference.pack_int4(codes), s, z


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("M,K,N", [(1, 256, 128), (3, 200, 160)])
def test_int8_weight_only_matches_reference(impl, M, K, N):
    x, q, s = _int8_inputs(M, K, N)
    y = qmm.int8_matmul(x, q, s, impl=impl)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    assert _rel_err(y, reference.int8_matmul_reference(x, q, s)) <= FP32_TOL


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_int8_weight_only_bf16(impl):
    x, q, s = _int8_inputs(5, 256, 256, seed=1)
    xb = x.astype(jnp.bfloat16)
    y = qmm.int8_matmul(xb, q, s, impl=impl)
    assert y.dtype == jnp.bfloat16
    ref = reference.int8_matmul_reference(xb.astype(jnp.float32), q, s)
    assert _rel_err(y.astype(jnp.float32), ref) <= BF16_TOL


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize(
    "mode,M,K,N,G", [("affine", 1, 256, 128, 32), ("codebook", 7, 120, 160, 32), ("symmetric", 16, 128, 64, 64)]
)
def test_int4_matches_reference(impl, mode, M, K, N, G):
    K_pad = -(-K // (2 * G)) * 2 * G
    x, packed, s, z = _int4_inputs(M, K_pad, N, G, seed=M)
    x = x[:, :K]  # x narrower than K_pad: the wrapper pads it
    zeros = z if mode == "affine" else None
    cb = NF4_LIKE if mode == "codebook" else None
    y = qmm.int4_matmul(x, packed, s, zeros, group_size=G, codebook=cb, impl=impl)
    ref = reference.int4_matmul_reference(x, packed, s, zeros, cb, group_size=G)
    assert y.shape == (M, N)
    assert _rel_err(y, ref) <= FP32_TOL


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_int4_bf16_affine(impl):
    x, packed, s, z = _int4_inputs(4, 256, 128, 64, seed=3)
    xb = x.astype(jnp.bfloat16)
    y = qmm.int4_matmul(xb, packed, s, z, group_size=64, impl=impl)
    assert y.dtype == jnp.bfloat16
    ref = reference.int4_matmul_reference(xb.astype(jnp.float32), packed, s, z, group_size=64)
    assert _rel_err(y.astype(jnp.float32), ref) <= BF16_TOL


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_int8_int8_to_int32_is_exact(impl):
    k = jax.random.split(jax.random.key(5), 2)
    x = jax.random.randint(k[0], (9, 300), -128, 128).astype(jnp.int8)
    w = jax.random.randint(k[1], (300, 130), -128, 128).astype(jnp.int8)
    y = qmm.int8_int8_matmul(x, w, impl=impl)
    assert y.dtype == jnp.int32
    exact = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
    np.testing.assert_array_equal(np.asarray(y), exact)


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_pack_unpack_exact(half_rows, N, seed):
    codes = np.random.default_rng(seed).integers(0, 16, size=(2 * half_rows, N))
    packed = reference.pack_int4(jnp.asarray(codes))
    assert packed.dtype == jnp.uint8 and packed.shape == (half_rows, N)
    np.testing.assert_array_equal(np.asarray(reference.unpack_int4(packed)), codes)
    # Layout: row r in the low nibble, row r + P in the high nibble.
    np.testing.assert_array_equal(np.asarray(packed) & 0xF, codes[:half_rows])
    np.testing.assert_array_equal(np.asarray(packed) >> 4, codes[half_rows:])


def test_wrapper_rejects_bad_input():
    x, q, s = _int8_inputs(2, 64, 32)
    with pytest.raises(ValueError, match="block_m=24"):
        qmm.int8_matmul(x, q, s, impl="interpret", block_sizes=qmm.BlockSizes(block_m=24))
    with pytest.raises(ValueError, match="q must be int8"):
        qmm.int8_matmul(x, q.astype(jnp.int32), s, impl="interpret")
    with pytest.raises(ValueError, match="K=64 columns but the weight expects 32"):
        qmm.int8_matmul(x, q[:32], s, impl="interpret")
    with pytest.raises(ValueError, match="impl='cuda'"):
        qmm.int8_matmul(x, q, s, impl="cuda")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a GPU or TPU"):
            qmm.int8_matmul(x, q, s, impl="pallas")
    xq, packed, s4, z = _int4_inputs(2, 96, 32, 24)
    with pytest.raises(ValueError, match="power of two >= 16; got 24"):
        qmm.int4_matmul(xq, packed, s4, z, group_size=24, impl="interpret")
    # the reference accepts any group size dividing K_pad / 2
    assert qmm.int4_matmul(xq, packed, s4, z, group_size=24, impl="xla").shape == (2, 32)
    with pytest.raises(ValueError, match="scales must be"):
        qmm.int4_matmul(xq, packed, s4[:2], z[:2], group_size=24, impl="xla")
