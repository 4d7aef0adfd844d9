"""Integer hashing for watermark keys, traced under jit with no Python per token: SynthID's 64-bit LCG and a
32-bit mixer for KGW and Gumbel.

Glossary: B batch, T time, V vocab, M depth (SynthID keys), H context width.

JAX runs without 64-bit integers by default, so SynthID's int64 hash (`transformers`'
`SynthIDTextWatermarkLogitsProcessor.accumulate_hash`: h <- (h + x) * 6364136223846793005 + 1, wrapping mod 2^64)
is carried as two uint32 words (hi, lo) and multiplied with 16-bit partial products. `mod_signed` reduces the
int64 value (read as signed, as torch's `%` does) modulo the sampling-table size. The sampling table itself is
torch's `randint(0, 2)` stream for the seed: the low bit of successive MT19937 outputs, which numpy's legacy
`RandomState` produces for the same seed.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

LCG_MULTIPLIER = 6364136223846793005
_U32 = jnp.uint32
_MASK64 = (1 << 64) - 1
MAX_TABLE_SIZE = 1 << 24  # mod_signed folds bytes into a uint32 remainder: r * 256 + byte must stay < 2^32


def split64(x: int) -> tuple[int, int]:
    """(hi, lo) 32-bit words of the two's-complement 64-bit value of a Python int."""
    x &= _MASK64
    return x >> 32, x & 0xFFFFFFFF


def join64(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The signed int64 values of (hi, lo) uint32 word pairs (numpy, for tests and fixtures)."""
    u = (np.asarray(hi, np.uint64) << np.uint64(32)) | np.asarray(lo, np.uint64)
    return u.view(np.int64)


def _mul32_wide(a, b):
    """(hi, lo) of the full 64-bit product of two uint32 arrays, from 16-bit halves."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    lo = a * b  # uint32 multiply wraps mod 2^32
    return hi, lo


def add64(h, x):
    """(h + x) mod 2^64 for (hi, lo) pairs; x may be a pair of arrays or of Python ints."""
    hi, lo = h
    xhi, xlo = x
    new_lo = lo + _U32(xlo) if isinstance(xlo, int) else lo + xlo
    carry = (new_lo < lo).astype(_U32)
    return hi + (_U32(xhi) if isinstance(xhi, int) else xhi) + carry, new_lo


def lcg_step(h, x):
    """One step of SynthID's hash: (h + x) * 6364136223846793005 + 1 mod 2^64, on (hi, lo) uint32 pairs."""
    hi, lo = add64(h, x)
    mhi, mlo = split64(LCG_MULTIPLIER)
    phi, plo = _mul32_wide(lo, _U32(mlo))
    phi = phi + lo * _U32(mhi) + hi * _U32(mlo)
    return add64((phi, plo), (0, 1))


def lcg_step_low(lo, x):
    """The low 32-bit word of `lcg_step`: (lo + x) * M + 1 mod 2^32. Carries only move upward, so the low word of
    the 64-bit hash depends only on the low words of its inputs: enough for a power-of-two table (<= 2^32)."""
    x_lo = _U32(x & 0xFFFFFFFF) if isinstance(x, int) else jnp.asarray(x).astype(_U32)
    return (lo + x_lo) * _U32(split64(LCG_MULTIPLIER)[1]) + _U32(1)


def token_pair(tokens):
    """(hi, lo) uint32 words of non-negative int32 token ids."""
    t = jnp.asarray(tokens).astype(_U32)
    return jnp.zeros_like(t), t


def accumulate(h, tokens_XT):
    """Folds the last axis of `tokens_XT` (non-negative ids) into the hash pair h (broadcast against X), in order."""
    for i in range(tokens_XT.shape[-1]):
        h = lcg_step(h, token_pair(tokens_XT[..., i]))
    return h


def ones_like_hash(shape) -> tuple:
    """The hash's start value 1 as an (hi, lo) pair of uint32 arrays of `shape`."""
    return jnp.zeros(shape, _U32), jnp.ones(shape, _U32)


def mod_signed(h, n: int):
    """int32 (value mod n) of the signed int64 held in h, floor-mod like torch's `%` (result in [0, n))."""
    hi, lo = h
    if n & (n - 1) == 0:  # a power of two: the low bits, whatever the sign (two's complement)
        return (lo & _U32(n - 1)).astype(jnp.int32)
    if not 1 <= n <= MAX_TABLE_SIZE:
        raise ValueError(f"sampling_table_size={n}: expected a power of two or an int in [1, {MAX_TABLE_SIZE}]")
    r = jnp.zeros_like(lo)
    for word in (hi, lo):
        for shift in (24, 16, 8, 0):
            r = (r * _U32(256) + ((word >> shift) & 0xFF)) % _U32(n)
    # A negative value is u - 2^64: subtract 2^64 mod n.
    neg = (hi >> 31) == 1
    c = _U32((1 << 64) % n)
    r = jnp.where(neg, (r + _U32(n) - c) % _U32(n), r)
    return r.astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def sampling_table(size: int, seed: int) -> np.ndarray:
    """SynthID's g-value table: torch.randint(0, 2, (size,), generator=manual_seed(seed)), made with numpy (int32)."""
    bits = np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2, size=size, dtype=np.uint32).astype(np.int32)
    bits.flags.writeable = False  # shared by every caller through the cache
    return bits


def mix32(x):
    """A 32-bit avalanche mixer (murmur3's finaliser) on uint32 arrays."""
    x = x ^ (x >> 16)
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * _U32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash32(seed, tokens_XH):
    """A uint32 hash of a key/seed (broadcast against X) and the last axis of `tokens_XH`, order-sensitive."""
    h = jnp.asarray(seed).astype(_U32)
    for i in range(tokens_XH.shape[-1]):
        h = mix32(h * _U32(0x9E3779B1) + tokens_XH[..., i].astype(_U32) + _U32(0x7F4A7C15))
    return h


def uniform_from_hash(h):
    """Floats in (0, 1) from uint32 hashes: the top 24 bits, centred in their cell."""
    return ((h >> 8).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-24)
