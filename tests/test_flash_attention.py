"""Flash attention: the Pallas kernels (interpret mode on CPU) against the pure-jnp reference, forward and gradients.

Dimension letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
Tolerances (max-abs) are those of issue 4 and are never loosened to pass: fp32 forward 1e-5, fp32 gradients 2e-4;
bf16 forward 1e-2, bf16 gradients 2e-2 (against the fp32 reference of the same bf16-rounded inputs).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.flash_attention import BlockSizes, attention_reference, gpu
from kernels.flash_attention.reference import mask_TS

FP32_FWD, FP32_GRAD, BF16_FWD, BF16_GRAD = 1e-5, 2e-4, 1e-2, 2e-2


def _inputs(seed, B, T, S, H, K, D, dtype=jnp.float32, n_segments=0):
    kq, kk, kv, kd, ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, D), jnp.float32).astype(dtype)
    # bf16: a half-scale cotangent keeps |dk|, |dv| < 4, where bf16's half-ulp is 0.008.  At |dv| >= 8 rounding the
    # exact gradient to bf16 alone costs up to 0.031 > 2e-2, so no bf16-output kernel could meet the bound there.
    do = jax.random.normal(kd, (B, T, H, D), jnp.float32) * (0.5 if dtype == jnp.bfloat16 else 1.0)
    seg = None
    if n_segments:  # sorted random segment ids, as packed sequences have
        seg = jnp.sort(jax.random.randint(ks, (B, T), 0, n_segments), axis=1)
    return q, k, v, do, seg


@functools.partial(jax.jit, static_argnames=("impl", "opts"))
def _fwd_and_grads(q, k, v, do, seg, impl, opts, prefix=None):
    kw = dict(opts)
    if "block" in kw:
        kw["block_sizes"] = BlockSizes(*kw.pop("block"))
    if prefix is not None:
        kw["prefix_len"] = prefix

    def f(q, k, v):
        return kernels.flash_attention(q, k, v, segment_ids=seg, impl=impl, **kw)

    o, vjp = jax.vjp(f, q, k, v)
    return o, vjp(do.astype(o.dtype))


def _check(q, k, v, do, seg=None, fwd_tol=FP32_FWD, grad_tol=FP32_GRAD, impl="interpret", prefix=None, **opts):
    """Kernel (interpret) vs reference (xla, fp32 of the same inputs): forward and dq, dk, dv max-abs errors."""
    do = do.astype(q.dtype).astype(jnp.float32)  # the kernel sees the cotangent in its own dtype: so does the reference
    o, grads = _fwd_and_grads(q, k, v, do, seg, impl, tuple(sorted(opts.items())), prefix)
    ref_opts = tuple(sorted((n, x) for n, x in opts.items() if n != "block"))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, grads_ref = _fwd_and_grads(*f32, do, seg, "xla", ref_opts, prefix)
    assert o.dtype == q.dtype and o.shape == q.shape
    errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) for a, b in zip((o, *grads), (o_ref, *grads_ref))]
    assert all(np.isfinite(errs)), errs
    assert errs[0] <= fwd_tol, f"forward max-abs {errs[0]:.3g} > {fwd_tol}"
    for name, err in zip(("dq", "dk", "dv"), errs[1:]):
        assert err <= grad_tol, f"{name} max-abs {err:.3g} > {grad_tol} (all errors {errs})"
    return o, grads


def _naive_numpy(q, k, v, causal, window, softcap, seg, prefix=None):
    """Loop-per-row numpy softmax attention (fp64): the reference's own reference (`prefix`: [B] prefix lengths)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                pos = i + S - T
                P = 0 if prefix is None else prefix[b]
                keys = [
                    j
                    for j in range(S)
                    if (not causal or ((j <= pos or (pos < P and j < P)) and (window is None or j > pos - window)))
                    and (seg is None or seg[b, i] == seg[b, j])
                ]
                if not keys:
                    continue
                s = np.array([q[b, i, h] @ k[b, j, h // (H // K)] for j in keys]) / np.sqrt(D)
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, i, h] = sum(pj * v[b, j, h // (H // K)] for pj, j in zip(p, keys))
    return out


@pytest.mark.parametrize(
    "T,S,causal,window,softcap,n_seg",
    [
        (9, 9, True, None, None, 0),
        (9, 9, False, None, 2.0, 3),
        (9, 9, True, 3, None, 2),
        (5, 9, True, None, None, 0),
        (9, 5, True, 2, 1.5, 0),
    ],  # fmt: skip
)
def test_reference_matches_naive_numpy(T, S, causal, window, softcap, n_seg):
    q, k, v, _, seg = _inputs(0, 2, T, S, 4, 2, 8, n_segments=n_seg)
    out = attention_reference(
        q, k, v, causal=causal, window=window, softcap=softcap, segment_ids=None if seg is None else (seg, seg)
    )
    expect = _naive_numpy(q, k, v, causal, window, softcap, None if seg is None else np.asarray(seg))
    np.testing.assert_allclose(np.asarray(out), expect, atol=1e-5)


FEATURES = {
    "plain": dict(causal=False),
    "causal": dict(),
    "gqa": dict(H=4, K=1),
    "segments": dict(causal=False, n_seg=3),
    "window": dict(window=7),
    "softcap": dict(causal=False, softcap=1.0),
    "causal_segments_gqa": dict(H=4, K=2, n_seg=3),
    "all": dict(H=4, K=2, n_seg=2, window=9, softcap=2.0),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_features_fp32(name):
    f = dict(FEATURES[name])
    H, K, n_seg = f.pop("H", 2), f.pop("K", 2), f.pop("n_seg", 0)
    q, k, v, do, seg = _inputs(1, 2, 40, 40, H, K, 16, n_segments=n_seg)
    _check(q, k, v, do, seg, block=(16, 16), **f)


@pytest.mark.parametrize("name", ["causal", "all"])
def test_features_bf16(name):
    f = dict(FEATURES[name])
    H, K, n_seg = f.pop("H", 2), f.pop("K", 2), f.pop("n_seg", 0)
    q, k, v, do, seg = _inputs(2, 2, 48, 48, H, K, 32, jnp.bfloat16, n_segments=n_seg)
    _check(q, k, v, do, seg, BF16_FWD, BF16_GRAD, block=(16, 32), **f)


@pytest.mark.parametrize("T", [1, 7, 100, 129])
def test_awkward_lengths(T):
    q, k, v, do, _ = _inputs(3, 1, T, T, 2, 1, 16)
    _check(q, k, v, do, block=(32, 32), window=34)  # row 64 sees key 31: a block edge


def test_fully_masked_rows_are_zero_and_nan_free():
    # T > S with bottom-right causal alignment: the first T - S queries see no key at all.
    q, k, v, do, _ = _inputs(4, 1, 24, 8, 2, 2, 16)
    o, grads = _check(q, k, v, do, block=(16, 16))
    assert float(jnp.max(jnp.abs(o[:, : 24 - 8]))) == 0.0
    assert float(jnp.max(jnp.abs(grads[0][:, : 24 - 8]))) == 0.0
    # Cross-attention with segment pairs: query segment 9 has no key of its segment.
    q, k, v, do, _ = _inputs(5, 1, 20, 20, 2, 2, 16)
    q_seg = jnp.array([[0] * 10 + [9] * 10])
    kv_seg = jnp.array([[0] * 12 + [1] * 8])
    o, _ = _check(q, k, v, do, (q_seg, kv_seg), causal=False, block=(16, 16))
    assert float(jnp.max(jnp.abs(o[:, 10:]))) == 0.0


@pytest.mark.parametrize(
    "name", ["all"] + [pytest.param(n, marks=pytest.mark.slow) for n in FEATURES if n != "all"]
)  # "all": causal + GQA + segments + window + softcap in one fast case; each feature alone is slow-marked
def test_tpu_kernel_interpret(name):
    """The Mosaic-style kernel under TPU interpret mode (out-of-bounds reads raise, scratch starts as NaN)."""
    f = dict(FEATURES[name])
    H, K, n_seg = f.pop("H", 2), f.pop("K", 2), f.pop("n_seg", 0)
    q, k, v, do, seg = _inputs(8, 1, 40, 40, H, K, 16, n_segments=n_seg)
    _check(q, k, v, do, seg, impl="interpret_tpu", block=(16, 16), **f)


def test_tpu_kernel_interpret_bf16_awkward():
    q, k, v, do, seg = _inputs(9, 1, 37, 37, 2, 1, 32, jnp.bfloat16, n_segments=2)
    _check(q, k, v, do, seg, BF16_FWD, BF16_GRAD, impl="interpret_tpu", block=(16, 16), window=11, softcap=5.0)


@settings(max_examples=5, deadline=None)
@given(
    data=st.data(),
    T=st.integers(1, 64),
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]),
    D=st.sampled_from([16, 32]),
    causal=st.booleans(),
    block=st.tuples(st.sampled_from([16, 32]), st.sampled_from([16, 32])),
)
def test_random_shapes_fp32(data, T, heads, D, causal, block):
    n_seg = data.draw(st.sampled_from([0, 0, 2, 4]), label="n_seg")
    S = T if n_seg else data.draw(st.integers(1, 64), label="S")
    window = data.draw(st.one_of(st.none(), st.integers(1, 70)), label="window") if causal else None
    softcap = data.draw(st.sampled_from([None, 1.0, 30.0]), label="softcap")
    q, k, v, do, seg = _inputs(data.draw(st.integers(0, 2**16), label="seed"), 2, T, S, *heads, D, n_segments=n_seg)
    _check(q, k, v, do, seg, block=block, causal=causal, window=window, softcap=softcap)


@pytest.mark.parametrize(
    "T,S,bq,bk,window",
    [(64, 64, 16, 32, None), (64, 64, 32, 16, 20), (48, 80, 16, 16, 5), (64, 32, 16, 16, None), (64, 64, 16, 16, 2)],
)
@pytest.mark.parametrize("prefix", [None, 0, 23, 40, 64])  # prefix lengths inside, at and past block edges
def test_block_skipping_is_tight(T, S, bq, bk, window, prefix):
    """Loop bounds visit exactly the kv (q) blocks holding a visible entry: masked blocks are skipped, not visited."""
    cfg = gpu.KernelConfig(1.0, True, window, None, bq, bk, S - T, S, False, True, prefix is not None)
    P = None if prefix is None else min(prefix, S)  # api.py clamps prefix lengths to [0, S]
    vis_TS = np.asarray(mask_TS(T, S, causal=True, window=window, prefix_len=P))
    blocks_QC = vis_TS.reshape(T // bq, bq, S // bk, bk).any(axis=(1, 3))
    P = None if P is None else jnp.int32(P)
    for i in range(T // bq):
        lo, hi = (int(x) for x in gpu.kv_block_range(i, cfg, S // bk, P))
        assert list(range(lo, hi)) == list(np.flatnonzero(blocks_QC[i])), (i, lo, hi)
    for j in range(S // bk):
        lo, hi = (int(x) for x in gpu.q_block_range(j, cfg, T // bq, P))
        assert list(range(lo, hi)) == list(np.flatnonzero(blocks_QC[:, j])), (j, lo, hi)


# ------------------------------------------------------------------------------------------ prefix-LM masks


@pytest.mark.parametrize("T,S,window,softcap,n_seg", [(9, 9, None, None, 0), (9, 9, 3, 2.0, 2), (5, 9, 2, None, 0)])
def test_reference_prefix_matches_naive_numpy(T, S, window, softcap, n_seg):
    q, k, v, _, seg = _inputs(0, 3, T, S, 4, 2, 8, n_segments=n_seg)
    prefix = np.array([6, 0, S])  # mid-sequence, none, everything
    out = attention_reference(
        q, k, v, window=window, softcap=softcap, segment_ids=None if seg is None else (seg, seg), prefix_len=prefix
    )
    expect = _naive_numpy(q, k, v, True, window, softcap, None if seg is None else np.asarray(seg), prefix)
    np.testing.assert_allclose(np.asarray(out), expect, atol=1e-5)


PREFIXES = {"mid_block": [23, 5], "zero": [0, 0], "whole": [40, 40], "mixed": [0, 40]}


@pytest.mark.parametrize("features", ["causal", "all"])
@pytest.mark.parametrize("prefix", list(PREFIXES))  # the lengths are traced: one compile serves every prefix
def test_prefix_kernel_fp32(features, prefix):
    """The GPU-style kernel (interpret) under a prefix-LM mask, forward and gradients, against the reference."""
    f = dict(FEATURES[features])
    H, K, n_seg = f.pop("H", 2), f.pop("K", 2), f.pop("n_seg", 0)
    q, k, v, do, seg = _inputs(12, 2, 40, 40, H, K, 16, n_segments=n_seg)
    _check(q, k, v, do, seg, block=(16, 16), prefix=jnp.asarray(PREFIXES[prefix]), **f)


def test_prefix_tpu_kernel_interpret():
    """The Mosaic-style kernel's prefix (scalar-prefetched into its index maps and masks), all features at once."""
    f = dict(FEATURES["all"])
    H, K, n_seg = f.pop("H", 2), f.pop("K", 2), f.pop("n_seg", 0)
    q, k, v, do, seg = _inputs(13, 2, 40, 40, H, K, 16, n_segments=n_seg)
    _check(q, k, v, do, seg, impl="interpret_tpu", block=(16, 16), prefix=jnp.asarray([23, 0]), **f)


@pytest.mark.slow
def test_prefix_kernel_bf16():
    q, k, v, do, _ = _inputs(14, 2, 48, 48, 2, 1, 32, jnp.bfloat16)
    _check(q, k, v, do, None, BF16_FWD, BF16_GRAD, block=(16, 32), prefix=jnp.asarray([20, 48]))


def test_prefix_kernel_cross_lengths():
    """T != S (a chunk after a cache, bottom-right aligned): the prefix counts key positions."""
    q, k, v, do, _ = _inputs(15, 2, 24, 56, 2, 1, 16)
    _check(q, k, v, do, None, block=(16, 16), window=20, prefix=jnp.asarray([45, 30]))


def test_prefix_errors_are_actionable():
    q, k, v, _, _ = _inputs(16, 2, 8, 8, 2, 1, 16)
    prefix = jnp.asarray([3, 4])
    for impl in ("cudnn", "splash", "splash_interpret"):
        with pytest.raises(ValueError, match="no prefix-LM mask"):
            kernels.flash_attention(q, k, v, impl=impl, prefix_len=prefix)
    with pytest.raises(ValueError, match="requires causal=True"):
        kernels.flash_attention(q, k, v, causal=False, prefix_len=prefix)
    with pytest.raises(ValueError, match=r"shape \[B=2\]"):
        kernels.flash_attention(q, k, v, prefix_len=jnp.asarray([3]))
    with pytest.raises(ValueError, match=r"shape \[B=2\]"):
        kernels.flash_attention(q, k, v, prefix_len=jnp.asarray([3.0, 4.0]))


def test_auto_is_reference_on_cpu_and_errors_are_actionable():
    q, k, v, _, _ = _inputs(6, 1, 8, 8, 2, 1, 16)
    np.testing.assert_array_equal(kernels.flash_attention(q, k, v), kernels.flash_attention(q, k, v, impl="xla"))
    with pytest.raises(ValueError, match="expected one of"):
        kernels.flash_attention(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.flash_attention(q, k, v, impl="pallas")
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.flash_attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="must divide"):
        kernels.flash_attention(q, k[:, :, [0, 0, 0]], v[:, :, [0, 0, 0]])
    with pytest.raises(ValueError, match="requires causal"):
        kernels.flash_attention(q, k, v, causal=False, window=3)
    with pytest.raises(ValueError, match="power of two"):
        kernels.flash_attention(q, k, v, impl="interpret", block_sizes=BlockSizes(24, 16))
    with pytest.raises(ValueError, match="T == S"):
        kernels.flash_attention(q, k[:, :4], v[:, :4], segment_ids=jnp.zeros((1, 8), jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_dims_long_sequences(D, dtype):
    q, k, v, do, seg = _inputs(7, 1, 300, 300, 4, 2, D, dtype, n_segments=2)
    tols = (FP32_FWD, FP32_GRAD) if dtype == jnp.float32 else (BF16_FWD, BF16_GRAD)
    _check(q, k, v, do, seg, *tols, window=200, softcap=20.0)
    _check(q, k, v, do, None, *tols, causal=False, block=(64, 128))


# ------------------------------------------------------------------------------------------ splash (JAX's kernel)


@pytest.mark.parametrize(
    "name", ["all"] + [pytest.param(n, marks=pytest.mark.slow) for n in FEATURES if n != "all"]
)  # splash in interpret mode: the peer we measure against takes our arguments and agrees with our reference
def test_splash_interpret_matches_reference(name):
    f = dict(FEATURES[name])
    H, K, n_seg = f.pop("H", 2), f.pop("K", 2), f.pop("n_seg", 0)
    q, k, v, do, seg = _inputs(11, 1, 130, 130, H, K, 16, n_segments=n_seg)  # 130: padded to 256 inside
    _check(q, k, v, do, seg, impl="splash_interpret", **f)


def test_splash_needs_a_tpu():
    q, k, v, _, _ = _inputs(0, 1, 8, 8, 2, 2, 16)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="needs a TPU"):
            kernels.flash_attention(q, k, v, impl="splash")
