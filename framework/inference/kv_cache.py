"""KV caches for decoding: dense and paged, each in the compute dtype or int8; a free-list page allocator.

Glossary: L layers, B sequences, S slots per sequence (dense), P pages in the pool, C page size (tokens per page),
N page-table width (pages per sequence), K kv heads, Dh head dim, T tokens written per call.

A cache is a pytree (`KVCache`) the model threads through `lm.forward(..., kv_cache=cache)`:
- `layers`: the per-layer arrays with a leading L axis (`DenseLayer` [L, B, S, K, Dh], or [L, B, K, S, Dh] when
  `heads_major`, or `PagedLayer` [L, P, C, K, Dh]; int8 variants add per-token, per-head fp32 scales). The model's
  layer scan slices them, and each layer calls `layer.attend(...)`: the model never knows which layout it holds.
- `conv` (models with `short_conv` only): each position's input to the block's causal convolution ([L, B, S, D]
  dense, [L, P, C, D] paged, in the compute dtype), written at the chunk's positions like K/V; `conv_taps` reads a
  position's predecessors back, so a chunk or decode step convolves exactly what the cache-free pass does.
- `page_table` [B, N] (paged only): sequence b's position t lives in page `page_table[b, t // C]`, slot `t % C`;
  -1 = no page (writes there are dropped, reads never happen).
- `pool` (paged only): the `PagePool` free list the table's pages came from.

Attention over the cache: one new token per sequence (decoding) goes through `kernels.decode_attention` when the
model's `attention_impl` names a kernel ("pallas", "cudnn", "splash" -> the compiled Pallas decode kernel for the
backend; "interpret" -> the same kernel code in interpret mode); otherwise, and for multi-token chunks (prefill),
the cache is read as a contiguous view and the dense-mask reference attention runs over it.

Prefix-LM masks (`lm.forward(..., prefix_len_B=)`): a multi-token chunk applies the mask of
`attention.make_mask` by position, so a prefill that holds the whole prefix gives the cache-free logits. A chunk must
hold every prefix position it queries (keys are only what has been written), so the prefix goes in one call. One-token
steps take no prefix term at all: a query at position p >= prefix_len - 1 already sees every key up to p causally, so
decoding compiles to the same code with or without a prefix.

A dense cache read by the reference attention is stored heads-major ([B, K, S, Dh]): both attention matmuls then
batch over (b, k) with S and Dh contiguous, where the token-major layout made XLA copy (transpose) every layer's
whole cache at every decode step (a third of the decode step at batch 8 on CPU). The decode kernels read
token-major pages, so a dense cache for them stays token-major; `init_cache` picks the layout from the model's
attention_impl.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Int

from framework.models import attention as attn_lib
from framework.models import lm
from kernels import decode_attention

LAYOUTS = ("dense", "paged")
KV_DTYPES = ("float32", "bfloat16", "float16", "int8")
SCALE_DTYPE = jnp.float32
# attention_impl -> decode-kernel impl for one-token decode steps; names not listed use the dense-mask reference.
DECODE_KERNEL_IMPLS = {"pallas": "pallas", "cudnn": "auto", "splash": "pallas", "interpret": "interpret"}


def _write(cache, new, idx):
    """cache.at[idx].set(new) in the cache's dtype; out-of-range indices (no page) are dropped."""
    return cache.at[idx].set(new.astype(cache.dtype), mode="drop")


def _written(layer, k_BTKD, v_BTKD, idx):
    """`layer` (dense or paged) with the chunk's K/V stored at `idx` (quantised first if the layer is int8)."""
    if layer.k_scale is None:
        return layer.replace(k=_write(layer.k, k_BTKD, idx), v=_write(layer.v, v_BTKD, idx))
    (kq, ks), (vq, vs) = decode_attention.quantize_kv(k_BTKD), decode_attention.quantize_kv(v_BTKD)
    return layer.replace(
        k=_write(layer.k, kq, idx),
        v=_write(layer.v, vq, idx),
        k_scale=_write(layer.k_scale, ks, idx),
        v_scale=_write(layer.v_scale, vs, idx),
    )


def _reference_attend(
    q_BTHD, k_BSKD, v_BSKD, pos_BT, kv_pos_BS, compute_dtype, window=None, prefix_len_B=None, **score_kw
):
    mask_BTS = attn_lib.make_mask(pos_BT, kv_pos_BS, causal=True, window=window, prefix_len_B=prefix_len_B)
    return attn_lib.dot_product_attention(
        q_BTHD, k_BSKD.astype(compute_dtype), v_BSKD.astype(compute_dtype), mask_BTS=mask_BTS, impl="xla", **score_kw
    )


def _heads_major_attend(
    q_BTHD, k_BKSD, v_BKSD, pos_BT, compute_dtype, *, window=None, softcap=None, sm_scale=None, prefix_len_B=None
):
    """Causal (or prefix-LM) attention of a chunk's queries over a heads-major dense cache (slot s holds position s).
    Every query sees at least itself (its own token was just written), so no row needs zeroing."""
    kv_pos_1S = jnp.arange(k_BKSD.shape[2])[None, :]
    mask_BTS = attn_lib.make_mask(pos_BT, kv_pos_1S, causal=True, window=window, prefix_len_B=prefix_len_B)
    return attn_lib.grouped_attention(
        q_BTHD,
        k_BKSD.astype(compute_dtype),
        v_BKSD.astype(compute_dtype),
        mask_BTS=mask_BTS,
        softcap=softcap,
        sm_scale=q_BTHD.shape[-1] ** -0.5 if sm_scale is None else sm_scale,
    )


def _chunk_kw(q_BTHD, attn_kw: dict) -> dict:
    """attn_kw for this chunk: a one-token step drops the prefix length (causality already covers it; see the module
    docstring), so decode steps compile to the same code with or without a prefix."""
    if q_BTHD.shape[1] == 1:
        return {k: v for k, v in attn_kw.items() if k != "prefix_len_B"}
    return attn_kw


def _dense_page_size(S: int) -> int:
    """The page size the decode kernel reads a dense cache with: the largest power of two <= 128 dividing S."""
    return math.gcd(S, 128)


@struct.dataclass
class DenseLayer:
    """One layer's dense cache: slot s of sequence b holds position s."""

    k: Array  # [B, S, K, Dh]; [B, K, S, Dh] when heads_major
    v: Array
    k_scale: Array | None = None  # int8 only: [B, S, K] ([B, K, S] when heads_major)
    v_scale: Array | None = None
    conv: Array | None = None  # model.short_conv only: [B, S, D] each position's input to the block's convolution
    heads_major: bool = struct.field(pytree_node=False, default=False)

    def conv_taps(self, x_BTD, pos_BT, page_table, taps: int):
        """Writes the chunk's convolution inputs at its positions; returns the inputs at pos - 1 .. pos - taps + 1
        ([taps - 1, B, T, D], zeros before position 0) and the updated layer."""
        del page_table
        b_B1 = jnp.arange(x_BTD.shape[0])[:, None]
        conv = _write(self.conv, x_BTD, (b_B1, pos_BT))
        back = [pos_BT - j for j in range(1, taps)]
        read = [jnp.where((p >= 0)[..., None], conv[b_B1, jnp.clip(p, 0, conv.shape[1] - 1)], 0) for p in back]
        return jnp.stack(read).astype(x_BTD.dtype), self.replace(conv=conv)

    @property
    def slots(self) -> int:
        return self.k.shape[-2] if self.heads_major else self.k.shape[-3]

    def attend(self, page_table, q_BTHD, k_BTKD, v_BTKD, pos_BT, *, impl: str, compute_dtype, **attn_kw):
        """Writes the chunk, attends over the cache; attn_kw: window / softcap / sm_scale (Mistral, Gemma-2),
        prefix_len_B (a prefix-LM prefill)."""
        del page_table
        attn_kw = _chunk_kw(q_BTHD, attn_kw)
        B, S = self.k.shape[0], self.slots
        quantized = self.k_scale is not None
        if self.heads_major:
            idx = (jnp.arange(B)[:, None, None], jnp.arange(self.k.shape[1])[None, :, None], pos_BT[:, None, :])
            new = _written(self, k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3), idx)
            k_BKSD, v_BKSD = new.k, new.v
            if quantized:
                k_BKSD = decode_attention.dequantize_kv(k_BKSD, new.k_scale)
                v_BKSD = decode_attention.dequantize_kv(v_BKSD, new.v_scale)
            return _heads_major_attend(q_BTHD, k_BKSD, v_BKSD, pos_BT, compute_dtype, **attn_kw), new
        new = _written(self, k_BTKD, v_BTKD, (jnp.arange(B)[:, None], pos_BT))
        if q_BTHD.shape[1] == 1 and impl in DECODE_KERNEL_IMPLS:
            C = _dense_page_size(S)
            k_pages, table = decode_attention.dense_as_pages(new.k, C)
            v_pages, _ = decode_attention.dense_as_pages(new.v, C)
            scales = {}
            if quantized:
                scales = dict(
                    k_scales=decode_attention.dense_as_pages(new.k_scale, C)[0],
                    v_scales=decode_attention.dense_as_pages(new.v_scale, C)[0],
                )
            o_BHD = decode_attention.paged_attention(
                q_BTHD[:, 0],
                k_pages,
                v_pages,
                table,
                pos_BT[:, 0] + 1,
                impl=DECODE_KERNEL_IMPLS[impl],
                **scales,
                **attn_kw,
            )
            return o_BHD[:, None], new
        k_BSKD, v_BSKD = new.k, new.v
        if quantized:
            k_BSKD = decode_attention.dequantize_kv(k_BSKD, new.k_scale)
            v_BSKD = decode_attention.dequantize_kv(v_BSKD, new.v_scale)
        kv_pos_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
        return _reference_attend(q_BTHD, k_BSKD, v_BSKD, pos_BT, kv_pos_BS, compute_dtype, **attn_kw), new


@struct.dataclass
class PagedLayer:
    """One layer's page pool: page p, slot c holds the token the page table maps there."""

    k: Array  # [P, C, K, Dh]
    v: Array
    k_scale: Array | None = None  # [P, C, K] when int8
    v_scale: Array | None = None
    conv: Array | None = None  # model.short_conv only: [P, C, D] each position's input to the block's convolution

    def conv_taps(self, x_BTD, pos_BT, page_table, taps: int):
        """As `DenseLayer.conv_taps`, through the page table (positions on missing pages read zeros)."""
        P, C = self.conv.shape[:2]
        N = page_table.shape[1]

        def locate(p_BT):
            page_BT = jnp.take_along_axis(page_table, jnp.clip(p_BT // C, 0, N - 1), axis=1)
            return page_BT, (page_BT >= 0) & (p_BT >= 0) & (p_BT < N * C)

        page_BT, ok_BT = locate(pos_BT)
        conv = _write(self.conv, x_BTD, (jnp.where(ok_BT, page_BT, P), pos_BT % C))
        read = []
        for j in range(1, taps):
            page_BT, ok_BT = locate(pos_BT - j)
            x_BTD_j = conv[jnp.clip(page_BT, 0, P - 1), (pos_BT - j) % C]
            read.append(jnp.where(ok_BT[..., None], x_BTD_j, 0))
        return jnp.stack(read).astype(x_BTD.dtype), self.replace(conv=conv)

    def attend(self, page_table, q_BTHD, k_BTKD, v_BTKD, pos_BT, *, impl: str, compute_dtype, **attn_kw):
        """Writes the chunk, attends over the cache; attn_kw: window / softcap / sm_scale (Mistral, Gemma-2),
        prefix_len_B (a prefix-LM prefill)."""
        attn_kw = _chunk_kw(q_BTHD, attn_kw)
        P, C = self.k.shape[:2]
        B, N = page_table.shape
        quantized = self.k_scale is not None
        # Where each new token goes; tokens past the table or on a missing page (-1) get page P: dropped.
        page_BT = jnp.take_along_axis(page_table, jnp.clip(pos_BT // C, 0, N - 1), axis=1)
        page_BT = jnp.where((page_BT >= 0) & (pos_BT < N * C), page_BT, P)
        new = _written(self, k_BTKD, v_BTKD, (page_BT, pos_BT % C))
        if q_BTHD.shape[1] == 1 and impl in DECODE_KERNEL_IMPLS:
            scales = dict(k_scales=new.k_scale, v_scales=new.v_scale) if quantized else {}
            o_BHD = decode_attention.paged_attention(
                q_BTHD[:, 0],
                new.k,
                new.v,
                page_table,
                pos_BT[:, 0] + 1,
                impl=DECODE_KERNEL_IMPLS[impl],
                **scales,
                **attn_kw,
            )
            return o_BHD[:, None], new
        k_BSKD = decode_attention.reference.gather_pages(new.k, page_table)
        v_BSKD = decode_attention.reference.gather_pages(new.v, page_table)
        if quantized:
            k_BSKD = decode_attention.dequantize_kv(
                k_BSKD, decode_attention.reference.gather_pages(new.k_scale, page_table)
            )
            v_BSKD = decode_attention.dequantize_kv(
                v_BSKD, decode_attention.reference.gather_pages(new.v_scale, page_table)
            )
        # Slots of missing pages (clamped to page 0 by the gather) are hidden: no position maps there.
        kv_pos_BS = jnp.arange(N * C)[None, :] + jnp.zeros((B, 1), jnp.int32)
        kv_pos_BS = jnp.where(jnp.repeat(page_table >= 0, C, axis=1), kv_pos_BS, jnp.iinfo(jnp.int32).max)
        return _reference_attend(q_BTHD, k_BSKD, v_BSKD, pos_BT, kv_pos_BS, compute_dtype, **attn_kw), new


@struct.dataclass
class PagePool:
    """A free list of page indices: `free[:n_free]` are available, the top of the stack is `free[n_free - 1]`.

    Pure functions of the pool (`allocate`, `release`) work eagerly and inside jit / `lax.while_loop`.
    """

    free: Int[Array, " P"]
    n_free: Int[Array, ""]

    @classmethod
    def create(cls, num_pages: int) -> PagePool:
        # Popping from the top hands out pages 0, 1, 2, ... first (reversed stack), which keeps traces readable.
        return cls(jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32), jnp.int32(num_pages))


def allocate(
    pool: PagePool, counts_B: Int[Array, " B"], width: int
) -> tuple[PagePool, Int[Array, "B W"], Bool[Array, ""]]:
    """Pops counts_B[b] pages for each sequence b (all or nothing).

    Returns (pool, pages [B, width] with -1 past each row's count, ok). If the pool holds fewer pages than requested
    in total, nothing is allocated, every entry is -1 and ok is False.
    """
    counts_B = counts_B.astype(jnp.int32)
    total = jnp.sum(counts_B)
    ok = total <= pool.n_free
    start_B = jnp.cumsum(counts_B) - counts_B
    j_W = jnp.arange(width, dtype=jnp.int32)
    rank_BW = start_B[:, None] + j_W[None, :]
    take_BW = (j_W[None, :] < counts_B[:, None]) & ok
    stack_idx = jnp.clip(pool.n_free - 1 - rank_BW, 0, pool.free.shape[0] - 1)
    pages_BW = jnp.where(take_BW, pool.free[stack_idx], -1)
    return PagePool(pool.free, pool.n_free - jnp.where(ok, total, 0)), pages_BW, ok


def release(pool: PagePool, pages: Int[Array, ...]) -> PagePool:
    """Pushes every page id >= 0 in `pages` back on the free list (ids must be distinct and currently allocated)."""
    flat = pages.reshape(-1)
    valid = flat >= 0
    rank = jnp.cumsum(valid) - 1
    slot = jnp.where(valid, pool.n_free + rank, pool.free.shape[0])  # invalid entries land out of range: dropped
    return PagePool(pool.free.at[slot].set(flat, mode="drop"), pool.n_free + jnp.sum(valid, dtype=jnp.int32))


@struct.dataclass
class KVCache:
    """What the model threads through decoding: per-layer arrays (leading L) and, when paged, table and pool."""

    layers: DenseLayer | PagedLayer
    page_table: Array | None = None  # [B, N] int32
    pool: PagePool | None = None

    @property
    def stacked(self) -> bool:
        return not isinstance(self.layers, tuple)

    @property
    def layout(self) -> str:
        first = self.layers if self.stacked else self.layers[0]
        return "paged" if isinstance(first, PagedLayer) else "dense"

    @property
    def page_size(self) -> int:
        first = self.layers if self.stacked else self.layers[0]
        if self.layout == "dense":
            return _dense_page_size(first.slots)
        return int(first.k.shape[-3])


def unstack(cache: KVCache) -> KVCache:
    """The cache with its [L, ...] layer arrays split into a tuple of per-layer caches (for `lm.unstack_layers`
    params: each layer's cache is then its own buffer, updated in place by the decode loop)."""
    if not cache.stacked:
        return cache
    L = cache.layers.k.shape[0]
    return cache.replace(layers=tuple(jax.tree.map(lambda a, l=l: a[l], cache.layers) for l in range(L)))


def stack(cache: KVCache) -> KVCache:
    """Inverse of `unstack`."""
    if cache.stacked:
        return cache
    return cache.replace(layers=jax.tree.map(lambda *xs: jnp.stack(xs), *cache.layers))


def _check(cfg: lm.LMConfig, batch: int, seq_len: int, dtype: str, layout: str, page_size: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"KV cache layout {layout!r}: expected one of {LAYOUTS}")
    if str(dtype) not in KV_DTYPES:
        raise ValueError(f"KV cache dtype {dtype!r}: expected one of {KV_DTYPES}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"KV cache needs batch >= 1 and seq_len >= 1; got batch={batch}, seq_len={seq_len}")
    if layout == "paged" and page_size < 1:
        raise ValueError(f"page_size must be >= 1; got {page_size}")


def _layer_shapes(cfg, lead: tuple[int, ...], dtype: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    L, K, Dh = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    kv_dtype = jnp.int8 if dtype == "int8" else jnp.dtype(dtype)
    shapes = {"k": ((L, *lead, K, Dh), kv_dtype), "v": ((L, *lead, K, Dh), kv_dtype)}
    if dtype == "int8":
        shapes |= {"k_scale": ((L, *lead, K), SCALE_DTYPE), "v_scale": ((L, *lead, K), SCALE_DTYPE)}
    if cfg.short_conv:  # the convolution's inputs, in the compute dtype whatever the K/V dtype
        shapes["conv"] = ((L, *lead, cfg.d_model), cfg.compute_dtype)
    return shapes


def _paged_sizes(batch: int, seq_len: int, page_size: int, num_pages: int | None) -> tuple[int, int]:
    width = -(-seq_len // page_size)
    return width, batch * width if num_pages is None else num_pages


def init_cache(
    cfg: lm.LMConfig | Any,
    batch: int,
    seq_len: int,
    dtype: str | None = None,
    layout: str = "dense",
    *,
    page_size: int = 16,
    num_pages: int | None = None,
) -> KVCache:
    """An empty cache for `batch` sequences of up to `seq_len` tokens.

    dtype: "float32" | "bfloat16" | "float16" | "int8" (per-token, per-head fp32 scales); None = the model's compute
    dtype. Paged: `num_pages` pages of `page_size` tokens (default: enough for every sequence to reach seq_len) and a
    [batch, ceil(seq_len / page_size)] page table with no pages assigned yet (all -1); pages come from `allocate`.
    """
    cfg = lm.LMConfig.from_config(cfg)
    dtype = str(jnp.dtype(cfg.compute_dtype)) if dtype is None else str(dtype)
    _check(cfg, batch, seq_len, dtype, layout, page_size)
    if layout == "dense":
        # Heads-major for the reference attention, token-major for the decode kernels (see the module docstring).
        heads_major = cfg.attention_impl not in DECODE_KERNEL_IMPLS
        arrays = {}
        for name, (shape, d) in _layer_shapes(cfg, (batch, seq_len), dtype).items():
            if heads_major and name != "conv":  # [L, B, S, K, ...] -> [L, B, K, S, ...]
                shape = (shape[0], shape[1], shape[3], shape[2], *shape[4:])
            arrays[name] = jnp.zeros(shape, d)
        return KVCache(DenseLayer(**arrays, heads_major=heads_major))
    width, pages = _paged_sizes(batch, seq_len, page_size, num_pages)
    arrays = {k: jnp.zeros(s, d) for k, (s, d) in _layer_shapes(cfg, (pages, page_size), dtype).items()}
    return KVCache(PagedLayer(**arrays), jnp.full((batch, width), -1, jnp.int32), PagePool.create(pages))


def kv_cache_bytes(
    model_cfg: lm.LMConfig | Any,
    batch: int,
    seq_len: int,
    dtype: str = "bfloat16",
    layout: str = "dense",
    *,
    page_size: int = 16,
    num_pages: int | None = None,
) -> int:
    """Bytes `init_cache` allocates for these arguments: K and V (+ int8 scales), and for a paged cache the page
    table and the free list. Computed from shapes alone, so it sizes 70B-scale caches without allocating them."""
    cfg = lm.LMConfig.from_config(model_cfg)
    dtype = str(dtype)
    _check(cfg, batch, seq_len, dtype, layout, page_size)
    if layout == "dense":
        lead, extra = (batch, seq_len), 0
    else:
        width, pages = _paged_sizes(batch, seq_len, page_size, num_pages)
        lead, extra = (pages, page_size), 4 * (batch * width + pages + 1)  # int32 table, free stack, n_free
    shapes = _layer_shapes(cfg, lead, dtype)
    return sum(math.prod(s) * jnp.dtype(d).itemsize for s, d in shapes.values()) + extra


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree (e.g. a KVCache)."""
    return sum(x.nbytes for x in jax.tree.leaves(tree))
