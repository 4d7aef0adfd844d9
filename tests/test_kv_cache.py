"""KV caches: byte accounting, the page allocator, paged/int8 caches in the model, and generation through them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework.inference import generate, kv_cache, reference_generate
from framework.models import lm

ATOL = 1e-5  # fp32 logits: cache layouts differ only in summation order


@pytest.fixture(scope="module")
def model(tiny_cfg):
    # x3 sharpens the random model's logits so greedy never meets a near-tie between paths.
    params = jax.tree.map(lambda x: 3.0 * x, lm.init(tiny_cfg, jax.random.key(0)))
    return tiny_cfg, params


def _prompts(cfg, lens, seed=0):
    rs = np.random.RandomState(seed)
    return [np.concatenate([[cfg.bos_id], rs.randint(3, cfg.vocab_size, size=n - 1)]).astype(np.int32) for n in lens]


# ------------------------------------------------------------------------------------------------ byte accounting


@pytest.mark.parametrize("layout", kv_cache.LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("page_size", [4, 16])
def test_kv_cache_bytes_equals_allocated_arrays(tiny_cfg, layout, dtype, page_size):
    for batch, seq_len in [(1, 1), (3, 37), (2, 64)]:
        cache = kv_cache.init_cache(tiny_cfg, batch, seq_len, dtype, layout, page_size=page_size)
        expected = kv_cache.tree_bytes(cache)
        assert kv_cache.kv_cache_bytes(tiny_cfg, batch, seq_len, dtype, layout, page_size=page_size) == expected


def test_kv_cache_bytes_llama2_7b_shape():
    # Llama-2-7B: 32 layers, 32 kv heads of 128 dims; bf16 K+V = 2 * 32 * 32 * 128 * 2 bytes = 512 KiB per token.
    cfg = lm.LMConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, d_ff=11008)
    assert kv_cache.kv_cache_bytes(cfg, 1, 4096, "bfloat16") == 4096 * 512 * 1024
    # int8 halves the values and adds one fp32 scale per (token, head) for K and V
    assert kv_cache.kv_cache_bytes(cfg, 1, 4096, "int8") == 4096 * (256 * 1024 + 2 * 32 * 32 * 4)


def test_bad_cache_arguments_raise():
    cfg = lm.LMConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    with pytest.raises(ValueError, match="layout"):
        kv_cache.init_cache(cfg, 1, 8, layout="ring")
    with pytest.raises(ValueError, match="dtype"):
        kv_cache.kv_cache_bytes(cfg, 1, 8, "int4")


# ------------------------------------------------------------------------------------------------ page allocator


def test_allocator_hands_out_distinct_pages_and_reuses_released_ones():
    pool = kv_cache.PagePool.create(6)
    pool, pages, ok = kv_cache.allocate(pool, jnp.asarray([2, 0, 3]), 3)
    assert bool(ok) and int(pool.n_free) == 1
    got = np.asarray(pages)
    assert (got[1] == -1).all() and got[0, 2] == -1
    held = got[got >= 0]
    assert len(set(held.tolist())) == 5 and set(held.tolist()) <= set(range(6))
    # all or nothing: 2 pages requested, 1 free
    pool2, pages2, ok2 = kv_cache.allocate(pool, jnp.asarray([2]), 2)
    assert not bool(ok2) and int(pool2.n_free) == 1 and (np.asarray(pages2) == -1).all()
    # release row 2's pages; they are handed out again
    pool = kv_cache.release(pool, pages[2])
    assert int(pool.n_free) == 4
    pool, again, ok = kv_cache.allocate(pool, jnp.asarray([4]), 4)
    assert bool(ok) and int(pool.n_free) == 0
    assert set(np.asarray(again)[0].tolist()) == set(got[2].tolist()) | (set(range(6)) - set(held.tolist()))


# ------------------------------------------------------------------------------------------- caches in the model


def _paged_cache_with_scrambled_pool(cfg, B, seq_len, dtype, page_size, lens):
    """A paged cache whose pool hands pages out in a scrambled order, with each row's prefix pages allocated."""
    cache = kv_cache.init_cache(cfg, B, seq_len, dtype, "paged", page_size=page_size)
    order = np.random.default_rng(0).permutation(cache.pool.free.shape[0]).astype(np.int32)
    cache = cache.replace(pool=kv_cache.PagePool(jnp.asarray(order), cache.pool.n_free))
    width = cache.page_table.shape[1]
    pool, table, ok = kv_cache.allocate(cache.pool, jnp.asarray([width] * B), width)
    assert bool(ok)
    return cache.replace(pool=pool, page_table=table)


def _tokens_logits_cache(cfg, params, layout, dtype, B=2, T=12, S=16):
    """Random tokens [B, T], their cache-free logits, an empty cache of the layout, and the logits' tolerance."""
    tokens = jnp.asarray(np.random.RandomState(1).randint(3, cfg.vocab_size, size=(B, T)), jnp.int32)
    full = lm.forward(params, tokens, cfg).logits
    if layout == "dense":
        cache = kv_cache.init_cache(cfg, B, S, dtype)
    else:
        cache = _paged_cache_with_scrambled_pool(cfg, B, S, dtype, 4, [T] * B)
    atol = ATOL if dtype == "float32" else 5e-2  # int8 K/V: the logits move by quantisation noise only
    return tokens, full, cache, atol


@pytest.mark.parametrize(
    "layout,dtype", [("dense", "float32"), ("dense", "int8"), ("paged", "float32"), ("paged", "int8")]
)
@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_prefill_then_decode_equals_full_forward(model, layout, dtype, impl):
    cfg, params = model
    cfg = dataclasses.replace(cfg, attention_impl=impl)
    tokens, full, cache, atol = _tokens_logits_cache(cfg, params, layout, dtype)
    (B, T), prefix = tokens.shape, 5
    fwd = jax.jit(lm.forward, static_argnames=("cfg",))
    pos = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (B, prefix))
    out = fwd(params, tokens[:, :prefix], cfg, positions_BT=pos, kv_cache=cache)
    np.testing.assert_allclose(out.logits, full[:, :prefix], atol=atol, rtol=0)
    cache = out.kv_cache
    for t in range(prefix, T):
        out = fwd(params, tokens[:, t : t + 1], cfg, positions_BT=jnp.full((B, 1), t, jnp.int32), kv_cache=cache)
        cache = out.kv_cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=atol, rtol=0, err_msg=f"position {t}")


# -------------------------------------------------------------------------------------------------- generation

LENS, N = (3, 7, 12), 9


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kv_layout="paged", page_size=4),
        dict(kv_layout="paged", page_size=16),
        dict(kv_layout="dense", impl="interpret"),
        dict(kv_layout="paged", page_size=4, impl="interpret"),
    ],
    ids=["paged4", "paged16", "dense-kernel", "paged4-kernel"],
)
def test_generation_through_paged_cache_and_kernel_equals_reference(model, kwargs):
    cfg, params = model
    kwargs = dict(kwargs)
    cfg = dataclasses.replace(cfg, attention_impl=kwargs.pop("impl", "xla"))
    prompts = _prompts(cfg, LENS)
    out = generate(params, cfg, prompts, max_new_tokens=N, stop_tokens=(), **kwargs)
    ref = reference_generate(params, cfg, prompts, max_new_tokens=N, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=ATOL, rtol=0)


def test_int8_generation_kernel_equals_int8_reference_path(model):
    cfg, params = model
    prompts = _prompts(cfg, LENS)
    kw = dict(max_new_tokens=N, stop_tokens=(), kv_dtype="int8", kv_layout="paged", page_size=4)
    ref = generate(params, cfg, prompts, **kw)
    out = generate(params, dataclasses.replace(cfg, attention_impl="interpret"), prompts, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=ATOL, rtol=0)
    exact = generate(params, cfg, prompts, max_new_tokens=N, stop_tokens=())
    # quantisation noise only: the int8 cache keeps the per-token logprobs within 0.05 nats of the fp32 cache
    np.testing.assert_allclose(ref.logprobs, exact.logprobs, atol=5e-2, rtol=0)


def _peak_pages(lens, lengths, C):
    """Most pages held at once when rows take a page as they cross into it and return all pages when they stop."""
    last = [n - 1 for n in lengths]  # index of each row's last generated token
    peak = sum(-(-n // C) for n in lens)
    for i in range(1, max(last) + 1):
        peak = max(peak, sum(-(-(n + i) // C) for n, d in zip(lens, last) if d >= i))
    return peak


def test_pages_of_finished_rows_are_reused(model):
    cfg, params = model
    prompts = _prompts(cfg, LENS, seed=3)
    C, n_new = 2, 16
    free_run = generate(params, cfg, prompts, max_new_tokens=n_new, stop_tokens=())
    stop = int(free_run.tokens[0, 1])  # row 0 stops at its second token; others wherever they emit it
    dense = generate(params, cfg, prompts, max_new_tokens=n_new, stop_tokens=(stop,))
    lengths = np.asarray(dense.lengths)
    never_freed = sum(-(-(n + m - 1) // C) for n, m in zip(LENS, lengths))
    peak = _peak_pages(LENS, lengths, C)
    assert peak < never_freed, (peak, never_freed)  # the pool below is too small unless pages are reused
    out = generate(
        params, cfg, prompts, max_new_tokens=n_new, stop_tokens=(stop,), kv_layout="paged", page_size=C, num_pages=peak
    )
    np.testing.assert_array_equal(out.tokens, dense.tokens)
    np.testing.assert_array_equal(out.lengths, dense.lengths)
    with pytest.raises(RuntimeError, match="ran out of pages"):
        generate(
            params,
            cfg,
            prompts,
            max_new_tokens=n_new,
            stop_tokens=(stop,),
            kv_layout="paged",
            page_size=C,
            num_pages=peak - 1,
        )


def test_generate_rejects_bad_cache_arguments(model):
    cfg, params = model
    prompts = _prompts(cfg, (3,))
    with pytest.raises(ValueError, match="kv_layout"):
        generate(params, cfg, prompts, max_new_tokens=2, kv_layout="ring")
    with pytest.raises(ValueError, match="kv_dtype"):
        generate(params, cfg, prompts, max_new_tokens=2, kv_dtype="fp8")
    with pytest.raises(ValueError, match="page_size"):
        generate(params, cfg, prompts, max_new_tokens=2, kv_layout="paged", page_size=0)


# ------------------------------------------------------------------------------------------- short convolution


@pytest.fixture(scope="module")
def conv_model(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, short_conv=4)
    params = jax.tree.map(lambda x: 3.0 * x, lm.init(cfg, jax.random.key(0)))
    taps = params["layers"]["conv"]["taps"]
    params["layers"]["conv"]["taps"] = 0.5 * jax.random.normal(jax.random.key(1), taps.shape)
    return cfg, params


@pytest.mark.parametrize("layout,dtype", [("dense", "float32"), ("dense", "int8"), ("paged", "float32")])
def test_short_conv_prefill_chunks_and_decode_equal_full_forward(conv_model, layout, dtype):
    cfg, params = conv_model
    tokens, full, cache, atol = _tokens_logits_cache(cfg, params, layout, dtype)
    B, T = tokens.shape
    assert cache.layers.conv.shape[-1] == cfg.d_model
    fwd = jax.jit(lm.forward, static_argnames=("cfg",))
    # two prefill chunks (the second reads the first's last positions through the cache), then one token at a time
    for lo, hi in [(0, 3), (3, 7)] + [(t, t + 1) for t in range(7, T)]:
        pos = jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (B, hi - lo))
        out = fwd(params, tokens[:, lo:hi], cfg, positions_BT=pos, kv_cache=cache)
        cache = out.kv_cache
        np.testing.assert_allclose(out.logits, full[:, lo:hi], atol=atol, rtol=0, err_msg=f"positions {lo}..{hi}")


@pytest.mark.parametrize(
    "kwargs", [dict(kv_layout="dense"), dict(kv_layout="paged", page_size=4)], ids=["dense", "paged4"]
)
def test_short_conv_generation_equals_reference(conv_model, kwargs):
    cfg, params = conv_model
    prompts = _prompts(cfg, LENS)  # ragged: the decode steps overwrite the padded prefill's slots
    out = generate(params, cfg, prompts, max_new_tokens=N, stop_tokens=(), **kwargs)
    ref = reference_generate(params, cfg, prompts, max_new_tokens=N, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=ATOL, rtol=0)


def test_short_conv_needs_a_cache_built_for_it(conv_model, tiny_cfg):
    cfg, params = conv_model
    assert (
        kv_cache.kv_cache_bytes(cfg, 2, 16, "float32")
        == kv_cache.kv_cache_bytes(tiny_cfg, 2, 16, "float32") + 4 * cfg.n_layers * 2 * 16 * cfg.d_model
    )
    plain = kv_cache.init_cache(tiny_cfg, 1, 8)
    with pytest.raises(ValueError, match="short_conv=4 needs a KV cache with its conv buffer"):
        lm.forward(params, jnp.ones((1, 2), jnp.int32), cfg, kv_cache=plain)
