"""Paged decode attention: the Pallas kernels (GPU-style and TPU-style, in interpret mode) against the reference, and
the reference against plain attention over a contiguous cache.

Tolerances: fp32 max-abs 1e-5; bf16 1e-2; int8 cache: mean relative L2 of the output vs the fp32 cache <= 2e-2.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.decode_attention import dense_as_pages, paged_attention, paged_attention_reference, quantize_kv

KERNELS = ("interpret", "interpret_tpu")
FP32_ATOL, BF16_ATOL, INT8_REL_L2 = 1e-5, 1e-2, 2e-2


def _case(B=4, H=8, K=2, D=64, P=24, C=8, N=5, dtype=jnp.float32, seed=0):
    rs = np.random.default_rng(seed)
    q = jnp.asarray(rs.normal(size=(B, H, D)), dtype)
    k = jnp.asarray(rs.normal(size=(P, C, K, D)), dtype)
    v = jnp.asarray(rs.normal(size=(P, C, K, D)), dtype)
    # a permuted pool: sequence b's pages are scattered, never in order
    table = jnp.asarray(rs.permutation(P)[: B * N].reshape(B, N), jnp.int32)
    return q, k, v, table


def _plain_attention(q, k_pages, v_pages, table, lengths):
    """softmax(q k^T / sqrt(D)) v over each sequence's first `length` tokens, read contiguously in numpy."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    B, H, D = q.shape
    K = k_pages.shape[2]
    out = np.zeros((B, H, D))
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        k = np.concatenate([k_pages[p] for p in np.asarray(table[b])])[:n]  # [n, K, D]
        v = np.concatenate([v_pages[p] for p in np.asarray(table[b])])[:n]
        for h in range(H):
            s = k[:, h // (H // K)] @ q[b, h] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[:, h // (H // K)]
    return out


def _lengths(C, N):
    # empty, one token, page boundaries +-1, a full table
    return jnp.asarray([0, 1, C - 1, C, C + 1, 2 * C - 1, 2 * C + 1, N * C], jnp.int32)


def test_reference_equals_plain_attention_over_contiguous_cache():
    C, N = 8, 5
    lengths = _lengths(C, N)
    q, k, v, table = _case(B=len(lengths), P=48, C=C, N=N)
    ref = paged_attention_reference(q, k, v, table, lengths, sm_scale=q.shape[-1] ** -0.5)
    np.testing.assert_allclose(ref, _plain_attention(q, k, v, table, lengths), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("H,K", [(8, 2), (4, 4), (8, 1)], ids=["gqa", "mha", "mqa"])
def test_kernel_matches_reference_on_ragged_lengths_and_permuted_pages(impl, H, K):
    C, N = 8, 5
    lengths = _lengths(C, N)
    q, k, v, table = _case(B=len(lengths), H=H, K=K, P=48, C=C, N=N, seed=H + K)
    ref = paged_attention(q, k, v, table, lengths, impl="xla")
    out = paged_attention(q, k, v, table, lengths, impl=impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.any(np.isnan(out))
    np.testing.assert_allclose(out, ref, atol=FP32_ATOL, rtol=0)
    np.testing.assert_array_equal(out[0], 0.0)  # length 0: nothing visible, zeros (no NaN)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_head_dim_128_bf16_softcap(impl):
    C, N = 16, 3
    lengths = jnp.asarray([5, 16, 17, 48], jnp.int32)
    q, k, v, table = _case(B=4, H=4, K=2, D=128, P=16, C=C, N=N, dtype=jnp.bfloat16, seed=3)
    for softcap in (None, 2.0):
        ref = paged_attention(q, k, v, table, lengths, softcap=softcap, impl="xla")
        out = paged_attention(q, k, v, table, lengths, softcap=softcap, impl=impl)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("impl", ("xla",) + KERNELS)
def test_int8_cache_error_is_small(impl):
    C, N = 8, 4
    lengths = jnp.asarray([1, 7, 9, 32], jnp.int32)
    q, k, v, table = _case(B=4, H=8, K=2, D=64, P=20, C=C, N=N, seed=5)
    exact = np.asarray(paged_attention(q, k, v, table, lengths, impl="xla"))
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    assert kq.dtype == jnp.int8 and ks.shape == (20, C, 2)
    out = np.asarray(paged_attention(q, kq, vq, table, lengths, k_scales=ks, v_scales=vs, impl=impl))
    rel = np.linalg.norm(out - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
    assert rel.mean() <= INT8_REL_L2, rel.mean()
    if impl != "xla":  # the kernel dequantises exactly like the reference
        ref = paged_attention(q, kq, vq, table, lengths, k_scales=ks, v_scales=vs, impl="xla")
        np.testing.assert_allclose(out, ref, atol=FP32_ATOL, rtol=0)


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(
    K=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 3, 4]),
    C=st.sampled_from([4, 8, 16]),
    N=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_on_random_shapes(K, G, C, N, seed):
    B = 3
    q, k, v, table = _case(B=B, H=K * G, K=K, D=32, P=B * N + 2, C=C, N=N, seed=seed)
    lengths = jnp.asarray(np.random.default_rng(seed).integers(0, N * C + 1, size=B), jnp.int32)
    ref = paged_attention(q, k, v, table, lengths, impl="xla")
    np.testing.assert_allclose(paged_attention(q, k, v, table, lengths, impl="interpret"), ref, atol=FP32_ATOL, rtol=0)


def test_dense_cache_as_pages_is_a_view():
    rs = np.random.default_rng(0)
    cache = jnp.asarray(rs.normal(size=(2, 32, 2, 16)), jnp.float32)
    pages, table = dense_as_pages(cache, 8)
    assert pages.shape == (8, 8, 2, 16) and table.shape == (2, 4)
    np.testing.assert_array_equal(pages[table[1, 2], 3], cache[1, 2 * 8 + 3])
    with pytest.raises(ValueError, match="multiple of page_size"):
        dense_as_pages(cache, 12)


def test_validation_errors_name_the_problem():
    q, k, v, table = _case(B=2, P=10, N=3)
    lengths = jnp.asarray([1, 2], jnp.int32)
    with pytest.raises(ValueError, match="impl="):
        paged_attention(q, k, v, table, lengths, impl="triton")
    with pytest.raises(ValueError, match="must divide"):
        paged_attention(q[:, :3], k, v, table, lengths)
    with pytest.raises(ValueError, match="page_table"):
        paged_attention(q, k, v, table[:1], lengths)
    with pytest.raises(ValueError, match="int8 needs scales"):
        paged_attention(q, k.astype(jnp.int8), v.astype(jnp.int8), table, lengths)
    kq, ks = quantize_kv(k)
    with pytest.raises(ValueError, match="scales must be"):
        paged_attention(q, kq, kq, table, lengths, k_scales=ks[:, :4], v_scales=ks[:, :4])
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a GPU or TPU"):
            paged_attention(q, k, v, table, lengths, impl="pallas")
    with pytest.raises(ValueError, match="page_size % 8"):
        kq4, ks4 = quantize_kv(k[:, :4])
        paged_attention(q, kq4, kq4, table, lengths, k_scales=ks4, v_scales=ks4, impl="interpret_tpu")


@pytest.mark.parametrize("impl", KERNELS)
def test_sliding_window_kernel_matches_reference_and_plain(impl):
    """window=w: only the w most recent positions are visible (Mistral / Gemma-2 local layers); lengths shorter
    than, equal to and past the window, across page boundaries."""
    C, N, w = 8, 5, 11
    lengths = _lengths(C, N)
    q, k, v, table = _case(B=len(lengths), P=48, C=C, N=N, seed=3)
    ref = paged_attention_reference(q, k, v, table, lengths, sm_scale=q.shape[-1] ** -0.5, window=w)
    # plain attention over the window only: positions length - w .. length - 1
    starts = np.maximum(np.asarray(lengths) - w, 0)
    kv = [np.concatenate([np.asarray(x)[p] for p in np.asarray(table[b])]) for x in (k, v) for b in range(len(lengths))]
    k_win = np.zeros_like(np.asarray(k)[: len(lengths) * N].reshape(len(lengths), N * C, *k.shape[2:]))
    v_win = np.zeros_like(k_win)
    for b in range(len(lengths)):
        n = int(lengths[b])
        k_win[b, : n - starts[b]] = kv[b][starts[b] : n]
        v_win[b, : n - starts[b]] = kv[len(lengths) + b][starts[b] : n]
    plain_table = jnp.arange(len(lengths) * N, dtype=jnp.int32).reshape(len(lengths), N)
    plain = _plain_attention(
        q, k_win.reshape(-1, C, *k.shape[2:]), v_win.reshape(-1, C, *k.shape[2:]), plain_table, lengths - starts
    )
    np.testing.assert_allclose(ref, plain, atol=FP32_ATOL, rtol=0)
    out = paged_attention(q, k, v, table, lengths, window=w, impl=impl)
    np.testing.assert_allclose(out, ref, atol=FP32_ATOL, rtol=0)
    with pytest.raises(ValueError, match="window=0"):
        paged_attention(q, k, v, table, lengths, window=0, impl=impl)
