"""Public quantised-matmul entry points: validation, padding and the choice of implementation.

Dimension letters: M rows of x, K input features, N output features, G group size, P = K_pad / 2 packed rows.

`impl`:
- "xla": the pure-jnp reference (`reference.py`: dequantise the whole weight, then one fp32-accumulated dot).
- "interpret": the Pallas kernels of `gpu.py` through Pallas interpret mode (runs anywhere; what CPU tests use).
- "interpret_tpu": the Mosaic-style kernels of `tpu.py` through TPU interpret mode
  (`pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")`).
- "pallas": the compiled kernels: `gpu.py` (Triton) on GPU, `tpu.py` (Mosaic) on TPU; an error elsewhere.
- "auto": "pallas" on GPU, "xla" elsewhere.

Awkward sizes are padded here (M and N to their blocks, K to the contraction step) and the result sliced back, so
callers pass any M (decode: 1..16), N and K.  Padding a weight costs a copy per call: choose N (and, for int8, K)
multiples of the blocks on hot paths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

from kernels.quantized_matmul import gpu, reference, tpu

IMPLS = ("auto", "xla", "interpret", "interpret_tpu", "pallas")
_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Output-tile rows/columns and (int8) contraction step; powers of two >= 16, capped at the padded sizes."""

    block_m: int = 16
    block_n: int = 128
    block_k: int = 256


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pick_block(requested: int, length: int, name: str) -> int:
    if requested < 16 or requested & (requested - 1):
        raise ValueError(f"block_sizes.{name}={requested}: expected a power of two >= 16 (Triton tile rule)")
    return min(requested, max(16, _next_pow2(length)))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad2(x, rows: int, cols: int):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _resolve(impl: str) -> tuple[str, bool]:
    """(kernel module name or 'xla', interpret flag) for `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    backend = jax.default_backend()
    if impl == "auto":
        impl = "pallas" if backend == "gpu" else "xla"
    if impl == "xla":
        return "xla", False
    if impl == "pallas" and backend not in ("gpu", "tpu"):
        raise ValueError(f"impl='pallas' needs a GPU or TPU backend (this is {backend!r}); use 'interpret' or 'xla'")
    kind = "tpu" if impl == "interpret_tpu" or (impl == "pallas" and backend == "tpu") else "gpu"
    return kind, impl != "pallas"


def _check_x(x, K_expected: int, what: str):
    if x.ndim != 2:
        raise ValueError(f"{what}: x must be 2-D [M, K]; got shape {x.shape}")
    if jnp.dtype(x.dtype) not in _X_DTYPES:
        raise ValueError(f"{what}: x dtype must be float32/bfloat16/float16; got {x.dtype}")
    if x.shape[1] != K_expected:
        raise ValueError(f"{what}: x has K={x.shape[1]} columns but the weight expects {K_expected}")


def _tiles(M: int, N: int, bs: BlockSizes | None):
    bs = bs or BlockSizes()
    bm, bn = _pick_block(bs.block_m, M, "block_m"), _pick_block(bs.block_n, N, "block_n")
    return bs, bm, bn, _round_up(M, bm), _round_up(N, bn)


def int8_matmul(
    x: Float[Array, "M K"],
    q: Integer[Array, "K N"],
    scales: Float[Array, "1 N"],
    *,
    impl: str = "auto",
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "M N"]:
    """Weight-only int8: x @ (q * scales) with per-output-channel scales, fp32 accumulation, output in x's dtype."""
    if q.ndim != 2 or q.dtype != jnp.int8:
        raise ValueError(f"int8_matmul: q must be int8 [K, N]; got {q.dtype}{q.shape}")
    K, N = q.shape
    _check_x(x, K, "int8_matmul")
    if scales.shape != (1, N):
        raise ValueError(f"int8_matmul: scales must be [1, N={N}]; got {scales.shape}")
    kind, interpret = _resolve(impl)
    if kind == "xla":
        return reference.int8_matmul_reference(x, q, scales)
    M = x.shape[0]
    bs, bm, bn, M_pad, N_pad = _tiles(M, N, block_sizes)
    bk = _pick_block(bs.block_k, K, "block_k")
    K_pad = _round_up(K, bk)
    if kind == "tpu" and not interpret:
        _check_tpu_tiles(bm, bn, bk)
    mod = gpu if kind == "gpu" else tpu
    y = mod.int8_matmul(
        _pad2(x, M_pad, K_pad),
        _pad2(q, K_pad, N_pad),
        _pad2(scales, 1, N_pad),
        bm=bm,
        bn=bn,
        bk=bk,
        interpret=interpret,
    )
    return y[:M, :N]


def int4_matmul(
    x: Float[Array, "M K"],
    packed: Integer[Array, "P N"],
    scales: Float[Array, "G N"],
    zeros: Float[Array, "G N"] | None = None,
    *,
    group_size: int,
    codebook: tuple[float, ...] | None = None,
    impl: str = "auto",
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "M N"]:
    """Weight-only packed int4 ("halves" layout, see `reference.py`): affine (zeros), symmetric, or codebook (NF4).

    x may have K <= K_pad = 2P columns (zero-padded here); fp32 accumulation; output in x's dtype.
    """
    if packed.ndim != 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"int4_matmul: packed must be uint8 [K_pad/2, N]; got {packed.dtype}{packed.shape}")
    P, N = packed.shape
    G = int(group_size)
    if G <= 0 or P % G:
        raise ValueError(f"int4_matmul: group_size={group_size} must be positive and divide K_pad/2={P}")
    if scales.shape != (2 * P // G, N):
        raise ValueError(f"int4_matmul: scales must be [K_pad/G={2 * P // G}, N={N}]; got {scales.shape}")
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(f"int4_matmul: zeros must match scales {scales.shape}; got {zeros.shape}")
    if zeros is not None and codebook is not None:
        raise ValueError("int4_matmul: pass zeros (affine int4) or codebook (NF4), not both")
    if codebook is not None and len(codebook) != 16:
        raise ValueError(f"int4_matmul: codebook must have 16 levels; got {len(codebook)}")
    if x.ndim != 2 or x.shape[1] > 2 * P:
        raise ValueError(f"int4_matmul: x must be [M, K <= K_pad={2 * P}]; got {x.shape}")
    _check_x(x, x.shape[1], "int4_matmul")
    codebook = None if codebook is None else tuple(float(c) for c in codebook)
    kind, interpret = _resolve(impl)
    if kind == "xla":
        return reference.int4_matmul_reference(x, packed, scales, zeros, codebook, group_size=G)
    if G < 16 or G & (G - 1):
        raise ValueError(f"int4_matmul: the kernels need group_size a power of two >= 16; got {G} (use impl='xla')")
    M = x.shape[0]
    _, bm, bn, M_pad, N_pad = _tiles(M, N, block_sizes)
    if kind == "tpu" and not interpret:
        _check_tpu_tiles(bm, bn, G)
    mod = gpu if kind == "gpu" else tpu
    pad_n = lambda a: None if a is None else _pad2(a, a.shape[0], N_pad)  # noqa: E731
    y = mod.int4_matmul(
        _pad2(x, M_pad, 2 * P),
        pad_n(packed),
        pad_n(scales),
        pad_n(zeros),
        group=G,
        codebook=codebook,
        bm=bm,
        bn=bn,
        interpret=interpret,
    )
    return y[:M, :N]


def int8_int8_matmul(
    x: Integer[Array, "M K"],
    w: Integer[Array, "K N"],
    *,
    impl: str = "auto",
    block_sizes: BlockSizes | None = None,
) -> Integer[Array, "M N"]:
    """int8 x int8 -> int32, exact (the W8A8 matmul; scales are applied by the caller)."""
    if x.ndim != 2 or w.ndim != 2 or x.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise ValueError(f"int8_int8_matmul: x and w must be 2-D int8; got x {x.dtype}{x.shape}, w {w.dtype}{w.shape}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"int8_int8_matmul: x has K={x.shape[1]} columns, w has {w.shape[0]} rows")
    kind, interpret = _resolve(impl)
    if kind == "xla":
        return reference.int8_int8_matmul_reference(x, w)
    (M, K), N = x.shape, w.shape[1]
    bs, bm, bn, M_pad, N_pad = _tiles(M, N, block_sizes)
    bk = _pick_block(bs.block_k, K, "block_k")
    K_pad = _round_up(K, bk)
    if kind == "tpu" and not interpret:
        _check_tpu_tiles(bm, bn, bk)
    mod = gpu if kind == "gpu" else tpu
    y = mod.int8_int8_matmul(_pad2(x, M_pad, K_pad), _pad2(w, K_pad, N_pad), bm=bm, bn=bn, bk=bk, interpret=interpret)
    return y[:M, :N]


def _check_tpu_tiles(bm: int, bn: int, bk: int):
    """Mosaic tiling: a block's last two dims are multiples of (8, 128) (x blocks are [bm, bk], weights [bk, bn])."""
    if bm % 8 or bn % 128 or bk % 128:
        raise ValueError(
            f"TPU kernel needs block_m % 8 == 0 and block_n, block_k (int4: group_size) % 128 == 0; got "
            f"block_m={bm}, block_n={bn}, block_k={bk}"
        )
