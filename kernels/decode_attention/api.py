"""Public paged decode-attention entry point: validation, layout and the choice of implementation.

Dimension letters: B sequences, H query heads, K kv heads, G = H // K, D head dim, P pages in the pool, C page size,
N page-table width (pages per sequence).

`impl`:
- "xla": the pure-jnp reference (`reference.py`; gathers each sequence's pages into a contiguous view).
- "interpret": the GPU-style kernel (`gpu.py`) through Pallas interpret mode (runs anywhere; what CPU tests use).
- "interpret_tpu": the TPU-style kernel (`tpu.py`) through TPU interpret mode
  (`pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")`).
- "pallas": the compiled kernel for the backend (Triton on GPU, Mosaic on TPU); an error elsewhere.
- "auto": "pallas" on GPU, "xla" elsewhere (the Mosaic kernel has only run in interpret mode so far).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels.decode_attention import gpu, reference, tpu
from kernels.decode_attention.common import DecodeConfig

IMPLS = ("auto", "xla", "interpret", "interpret_tpu", "pallas")
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def _validate(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"expected q [B, H, D] and pages [P, C, K, D]; got q{q.shape}, k_pages{k_pages.shape}")
    (B, H, D), (P, C, K, Dk) = q.shape, k_pages.shape
    if v_pages.shape != k_pages.shape or Dk != D:
        raise ValueError(f"k_pages and v_pages must both be [P, C, K, D={D}]; got {k_pages.shape}, {v_pages.shape}")
    if H % K:
        raise ValueError(f"kv heads K={K} must divide query heads H={H}")
    if page_table.ndim != 2 or page_table.shape[0] != B or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(f"page_table must be an int [B={B}, N] array; got {page_table.dtype}{page_table.shape}")
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an int [B={B}] array; got {lengths.dtype}{lengths.shape}")
    if jnp.dtype(q.dtype) not in _FLOATS:
        raise ValueError(f"q must be float32/bfloat16/float16; got {q.dtype}")
    quantized = k_scales is not None or v_scales is not None
    if quantized:
        if k_scales is None or v_scales is None or k_pages.dtype != jnp.int8 or v_pages.dtype != jnp.int8:
            raise ValueError(
                "an int8 cache needs int8 k/v pages and both k_scales and v_scales; got pages "
                f"{k_pages.dtype}/{v_pages.dtype}, scales given: k={k_scales is not None}, v={v_scales is not None}"
            )
        if k_scales.shape != (P, C, K) or v_scales.shape != (P, C, K):
            raise ValueError(f"k/v scales must be [P, C, K] = {(P, C, K)}; got {k_scales.shape}, {v_scales.shape}")
    elif k_pages.dtype != v_pages.dtype or jnp.dtype(k_pages.dtype) not in _FLOATS:
        raise ValueError(
            f"float pages must share a float dtype (int8 needs scales); got {k_pages.dtype}/{v_pages.dtype}"
        )
    return quantized


def paged_attention(
    q: Float[Array, "B H D"],
    k_pages: Array,
    v_pages: Array,
    page_table: Int[Array, "B N"],
    lengths: Int[Array, " B"],
    *,
    k_scales: Float[Array, "P C K"] | None = None,
    v_scales: Float[Array, "P C K"] | None = None,
    sm_scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    impl: str = "auto",
) -> Float[Array, "B H D"]:
    """One query token per sequence attending over its cached keys, read page by page.

    q [B, H, D]; k_pages, v_pages [P, C, K, D] (float, or int8 with per-token-per-head `k_scales`/`v_scales`
    [P, C, K]); page_table [B, N]: sequence b's position t is in page `page_table[b, t // C]`, slot `t % C`;
    lengths [B]: how many positions each sequence sees (0 gives a zero output; values are clamped to N * C).
    Entries of the page table past a sequence's last page are never read. Output dtype = q dtype. `window`: a
    sliding window, only the `window` most recent positions of each sequence are visible.
    """
    quantized = _validate(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales, impl)
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"window={window!r}: expected None or an int >= 1")
    window = None if window is None else int(window)
    B, H, D = q.shape
    P, C, K, _ = k_pages.shape
    N = page_table.shape[1]
    sm_scale = D**-0.5 if sm_scale is None else float(sm_scale)
    softcap = None if softcap is None else float(softcap)
    backend = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if backend == "gpu" else "xla"
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, N * C)
    if impl == "xla":
        return reference.paged_attention_reference(
            q,
            k_pages,
            v_pages,
            page_table,
            lengths,
            k_scales_PCK=k_scales,
            v_scales_PCK=v_scales,
            sm_scale=sm_scale,
            softcap=softcap,
            window=window,
        )
    if impl == "pallas" and backend not in ("gpu", "tpu"):
        raise ValueError(f"impl='pallas' needs a GPU or TPU backend (this is {backend!r}); use 'interpret' or 'xla'")
    kind = "tpu" if impl == "interpret_tpu" or (impl == "pallas" and backend == "tpu") else "gpu"
    G = H // K
    if kind == "tpu" and quantized and C % 8:
        raise ValueError(f"the TPU kernel needs page_size % 8 == 0 for int8 scale blocks [C, K]; got page_size={C}")
    if impl == "pallas" and kind == "gpu" and not (_pow2(C) and _pow2(D)):
        raise ValueError(f"the Triton kernel needs power-of-two page_size and head dim; got page_size={C}, D={D}")
    q_BKGD = q.reshape(B, K, G, D)
    if kind == "gpu" and not _pow2(G):  # Triton blocks are powers of two: pad the heads of a group with zeros
        q_BKGD = jnp.pad(q_BKGD, ((0, 0), (0, 0), (0, (1 << (G - 1).bit_length()) - G), (0, 0)))
    cfg = DecodeConfig(
        sm_scale=sm_scale,
        softcap=softcap,
        page_size=C,
        pages_per_seq=N,
        quantized=quantized,
        interpret=impl != "pallas",
        window=window,
    )
    # Unused table entries may hold anything (e.g. -1): clamp them into the pool so no index map reads out of range.
    page_table = jnp.clip(page_table.astype(jnp.int32), 0, P - 1)
    kernel = tpu.paged_decode if kind == "tpu" else gpu.paged_decode
    o_BKGD = kernel(q_BKGD, k_pages, v_pages, k_scales, v_scales, page_table, lengths, cfg)
    return o_BKGD[:, :, :G].reshape(B, H, D)


def dense_as_pages(cache_BSKD: Array, page_size: int) -> tuple[Array, Int[Array, "B N"]]:
    """Views a dense [B, S, ...] cache as S / page_size pages per sequence (a reshape, no copy) plus its page table."""
    B, S = cache_BSKD.shape[:2]
    if S % page_size:
        raise ValueError(f"dense cache length {S} is not a multiple of page_size={page_size}")
    N = S // page_size
    pages = cache_BSKD.reshape(B * N, page_size, *cache_BSKD.shape[2:])
    return pages, jnp.arange(B * N, dtype=jnp.int32).reshape(B, N)
