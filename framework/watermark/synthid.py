"""SynthID-Text tournament watermark (Dathathri et al. 2024), bit-compatible with `transformers`' implementation.

Glossary: B batch, T time, S token-buffer slots, V vocab, M depth (number of keys), G n-grams (T - ngram_len + 1).

g-values: the n-gram ending at a token is hashed with SynthID's 64-bit LCG (start 1, then each n-gram token, then
one key per tournament layer), reduced mod `sampling_table_size` (floor mod of the signed value) and looked up in a
0/1 table drawn from `sampling_table_seed` (see `hashing`). `compute_g_values` returns exactly what
`SynthIDTextWatermarkLogitsProcessor.compute_g_values` returns for the same arguments (int32 here, int64 there).

Generation (`SynthID` as a logits processor): with 2 leaves per match the tournament's output distribution has a
closed form, applied layer by layer: p <- p * (1 + g_l - Σ_v p_v g_l(v)). Sampling from it is tournament sampling
(in distribution), and averaged over keys it is the model's distribution: non-distortionary. It runs after the
temperature and before top-k/top-p (`transformers` applies it after its warpers). A context (the previous
ngram_len - 1 tokens) that already occurred among the previous `context_history_size` positions is left
unwatermarked, as in the reference; a row with fewer than ngram_len - 1 tokens too (the reference instead starts
from a zero context: its first ngram_len - 1 tokens carry no signal under its own detector).

Detection: under "not watermarked" each g-value is Bernoulli(f), f = the table's fraction of ones, independently
over layers and over distinct n-grams, so the summed g-values of n scored tokens are Binomial(M n, f): the mean
score's p-value is exact. The weighted mean's p-value uses the normal approximation to the weighted sum.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from framework.watermark import base, hashing


def _check_keys(keys, where: str) -> tuple[int, ...]:
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence) or not len(keys):
        raise ValueError(f"{where}: keys={keys!r}: expected a non-empty sequence of ints (one per tournament layer)")
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -(2**63) <= k < 2**63:
            raise ValueError(f"{where}: keys contains {k!r}: expected int64 integers")
    return tuple(int(k) for k in keys)


def _check_table(size, seed, where: str) -> None:
    base.check_int("sampling_table_size", size, 1, hashing.MAX_TABLE_SIZE, where=where)
    base.check_int("sampling_table_seed", seed, 0, 2**63 - 1, where=where)


def default_weights(depth: int) -> np.ndarray:
    """The reference weighted-mean weights: linspace(10, 1, depth) rescaled to sum to depth."""
    w = np.linspace(10.0, 1.0, depth)
    return (w * depth / w.sum()).astype(np.float32)


def _is_pow2(n: int) -> bool:
    return n & (n - 1) == 0


def _g_from_hash(h, keys, table):
    """[*X, M] g-values of hash pairs h [*X] under each key (h may be a low word alone for power-of-two tables)."""
    return jnp.stack(_g_layers(h, keys, table), axis=-1)


def _g_layers(h, keys, table) -> list:
    """One [*X] g-value array per key."""
    n = table.shape[0]
    if _is_pow2(n):
        return _g_layers_packed(h[1], keys, n, table)
    return [jnp.asarray(table)[hashing.mod_signed(hashing.lcg_step(h, hashing.split64(k)), n)] for k in keys]


def _g_layers_packed(lo, keys, n: int, table, as_bool: bool = False) -> list:
    """`_g_layers` for a power-of-two table from one gather per hash: the index under key k is
    (lo + k) * A + 1 mod n = (lo * A mod n + e_k) mod n with e_k = k * A + 1 mod n, so one packed word at
    lo * A mod n holds the g-value of every key (bit m of word m // 32: `packed_table`)."""
    words = jnp.asarray(packed_table(table.tobytes(), n, _low_words(keys)))
    u = (lo * jnp.uint32(_MUL_LO) & jnp.uint32(n - 1)).astype(jnp.int32)
    packed = [words[w][u] for w in range(words.shape[0])]
    if as_bool:
        return [(packed[m // 32] & jnp.uint32(1 << (m % 32))) != 0 for m in range(len(keys))]
    return [((packed[m // 32] >> jnp.uint32(m % 32)) & jnp.uint32(1)).astype(jnp.int32) for m in range(len(keys))]


_MUL_LO = hashing.split64(hashing.LCG_MULTIPLIER)[1]


def _low_words(keys) -> tuple[int, ...]:
    return tuple(int(k) & 0xFFFFFFFF for k in keys)


@functools.lru_cache(maxsize=32)
def packed_table(table_bytes: bytes, n: int, keys_lo: tuple[int, ...]) -> np.ndarray:
    """[ceil(M / 32), n] uint32: bit m % 32 of word m // 32 at u is table[(u + k_m * A + 1) mod n], for the low
    32-bit words k_m of the keys and a power-of-two table of n entries (`table_bytes`, int32)."""
    table = np.frombuffer(table_bytes, np.int32)
    u = np.arange(n, dtype=np.uint64)
    words = np.zeros((-(-len(keys_lo) // 32), n), np.uint32)
    for m, k in enumerate(keys_lo):
        e = (k * _MUL_LO + 1) & (n - 1)
        words[m // 32] |= table[(u + e) & np.uint64(n - 1)].astype(np.uint32) << np.uint32(m % 32)
    words.flags.writeable = False
    return words


def _ngram_hash(h, tokens_XN, low: bool):
    """Folds the last axis of tokens into h (a pair); with `low` only the low word is carried (hi left as is)."""
    if not low:
        return hashing.accumulate(h, tokens_XN)
    hi, lo = h
    for i in range(tokens_XN.shape[-1]):
        lo = hashing.lcg_step_low(lo, tokens_XN[..., i])
    return hi, lo


def compute_g_values(
    token_ids_BT,
    *,
    keys: Sequence[int],
    ngram_len: int,
    sampling_table_size: int = 2**16,
    sampling_table_seed: int = 0,
    context_history_size: int = 1024,
) -> Int[Array, "B G M"]:
    """SynthID g-values of every n-gram, [B, T - ngram_len + 1, depth] int32, as `transformers` computes them.

    `context_history_size` does not enter the g-values (it is accepted so the reference's watermarking config can be
    passed whole); `context_repetition_mask` uses it.
    """
    keys = _check_keys(keys, "compute_g_values")
    _check_table(sampling_table_size, sampling_table_seed, "compute_g_values")
    base.check_int("context_history_size", context_history_size, 0, where="compute_g_values")
    tokens = jnp.asarray(token_ids_BT)
    if tokens.ndim != 2:
        raise ValueError(f"compute_g_values: token_ids_BT must be [B, T], got shape {tokens.shape}")
    ngram_len = base.check_int("ngram_len", ngram_len, 1, where="compute_g_values")
    if tokens.shape[1] < ngram_len:
        raise ValueError(f"compute_g_values: ngram_len={ngram_len} is longer than the text ({tokens.shape[1]} tokens)")
    return _g_values_jit(tokens.astype(jnp.int32), keys, ngram_len, sampling_table_size, sampling_table_seed)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _g_values_jit(tokens_BT, keys, ngram_len, table_size, table_seed):
    G = tokens_BT.shape[1] - ngram_len + 1
    grams_BGN = jnp.stack([tokens_BT[:, i : i + G] for i in range(ngram_len)], axis=-1)
    h = _ngram_hash(hashing.ones_like_hash(grams_BGN.shape[:2]), grams_BGN, _is_pow2(table_size))
    return _g_from_hash(h, keys, hashing.sampling_table(table_size, table_seed))


def tournament_logprobs(logits_BV: Float[Array, "B V"], g_BVM) -> Float[Array, "B V"]:
    """Log-probabilities of the winner of a 2-leaf tournament over layers m = 1..M with g-values g_BVM [B, V, M]:
    p <- p * (1 + g_m - Σ_v p_v g_m(v)) per layer (`transformers`' `update_scores`); -inf where p is 0, never NaN."""
    g_BVM = jnp.asarray(g_BVM)
    return _tournament(logits_BV, [g_BVM[..., m] for m in range(g_BVM.shape[-1])])


def _tournament(logits_BV, g_per_layer):
    """`tournament_logprobs` with the g-values as one [B, V] array per layer (contiguous, unlike [B, V, M] slices)."""
    probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    for g_BV in g_per_layer:
        g_BV = g_BV.astype(jnp.float32)
        # The factor is >= 0 in exact arithmetic; a rounded mass above 1 must not make a probability negative
        # (its log would be NaN, which a draw then picks): clip at 0, as the reference maps non-finite logs to -inf.
        factor_BV = 1.0 + g_BV - jnp.sum(g_BV * probs_BV, axis=-1, keepdims=True)
        probs_BV = probs_BV * jnp.maximum(factor_BV, 0.0)
    return jnp.log(probs_BV)


def _tournament_bits(logits_BV, bits_per_layer):
    """`_tournament` for boolean g-values, with the same float results: g * p is p or 0 and 1 + g - s is 2 - s or
    1 - s exactly, so selects replace the int-to-float converts and products (the sum's order is the reduce's own)."""
    probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    for bit_BV in bits_per_layer:
        s_B1 = jnp.sum(jnp.where(bit_BV, probs_BV, 0.0), axis=-1, keepdims=True)
        factor_BV = jnp.where(bit_BV, 2.0 - s_B1, 1.0 - s_B1)
        probs_BV = probs_BV * jnp.maximum(factor_BV, 0.0)
    return jnp.log(probs_BV)


@dataclasses.dataclass(frozen=True)
class SynthID:
    """SynthID processor: `generate(..., logits_processors=(SynthID(cfg.vocab_size, keys=(...), ngram_len=5),))`.

    vocab_size: the model's vocabulary. keys: one int per tournament layer (depth M = len(keys)). ngram_len: the
    hashed n-gram (context = ngram_len - 1 previous tokens). sampling_table_size / sampling_table_seed: the g-value
    table (as in `transformers`). context_history_size: repeated contexts within this many previous positions are
    not watermarked.
    """

    vocab_size: int
    keys: tuple[int, ...]
    ngram_len: int = 5
    sampling_table_size: int = 2**16
    sampling_table_seed: int = 0
    context_history_size: int = 1024

    def __post_init__(self):
        base.check_int("vocab_size", self.vocab_size, 1, where="SynthID")
        object.__setattr__(self, "keys", _check_keys(self.keys, "SynthID"))
        base.check_int("ngram_len", self.ngram_len, 2, where="SynthID")
        _check_table(self.sampling_table_size, self.sampling_table_seed, "SynthID")
        base.check_int("context_history_size", self.context_history_size, 0, where="SynthID")

    @property
    def depth(self) -> int:
        return len(self.keys)

    @property
    def table(self) -> np.ndarray:
        return hashing.sampling_table(self.sampling_table_size, self.sampling_table_seed)

    @property
    def g_rate(self) -> float:
        """f, the table's fraction of ones: P(g = 1) for text that does not know the keys."""
        return float(self.table.mean())

    def g_values(self, token_ids_BT) -> Int[Array, "B G M"]:
        """`compute_g_values` with this watermark's settings."""
        return compute_g_values(
            token_ids_BT,
            keys=self.keys,
            ngram_len=self.ngram_len,
            sampling_table_size=self.sampling_table_size,
            sampling_table_seed=self.sampling_table_seed,
        )

    def next_token_g(self, ctx_BC) -> Int[Array, "B V M"]:
        """g-values of every candidate next token after contexts ctx_BC [B, ngram_len - 1]."""
        return jnp.stack(self._next_token_layers(ctx_BC), axis=-1)

    def _next_token_layers(self, ctx_BC, as_bool: bool = False) -> list:
        low = _is_pow2(self.sampling_table_size)
        h = _ngram_hash(hashing.ones_like_hash(ctx_BC.shape[:1]), ctx_BC, low)
        h = tuple(x[:, None] for x in h)
        h = _ngram_hash(h, jnp.arange(self.vocab_size, dtype=jnp.int32)[None, :, None], low)
        if as_bool and low:
            return _g_layers_packed(h[1], self.keys, self.sampling_table_size, self.table, as_bool=True)
        layers = _g_layers(h, self.keys, self.table)
        return [g != 0 for g in layers] if as_bool else layers

    def __call__(self, logits_BV: Float[Array, "B V"], tokens_BS, lengths_B) -> Float[Array, "B V"]:
        base.check_vocab("SynthID", self.vocab_size, logits_BV)
        C = self.ngram_len - 1
        ctx_BC, ok_B = base.decode_context(tokens_BS, lengths_B, C)
        marked_BV = _tournament_bits(logits_BV, self._next_token_layers(ctx_BC, as_bool=True))
        repeated_B = base.repeated_decode_context(tokens_BS, lengths_B, C, self.context_history_size)
        keep_B = ok_B & ~repeated_B
        return jnp.where(keep_B[:, None], marked_BV, logits_BV)

    def token_values(self, tokens_BT: Int[Array, "B T"], weights=None):
        """Per position t: the (weighted) sum of the g-values of the n-gram ending at t, the 64-bit key of its
        context for the repeated-context mask, and whether t has a full n-gram (t >= ngram_len - 1)."""
        B, T = tokens_BT.shape
        C = self.ngram_len - 1
        g_BGM = self.g_values(tokens_BT).astype(jnp.float32)
        w = jnp.ones((self.depth,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        val_BT = jnp.pad(g_BGM @ w, ((0, 0), (C, 0)))
        idx_TC = jnp.arange(T)[:, None] - C + jnp.arange(C)[None, :]
        ctx_BTC = tokens_BT[:, jnp.clip(idx_TC, 0, T - 1)]
        hi, lo = hashing.accumulate(hashing.ones_like_hash((B, T)), ctx_BTC)
        full_BT = jnp.broadcast_to(jnp.arange(T)[None, :] >= C, (B, T))
        return val_BT, (hi, lo), full_BT

    def score_and_pvalue(self, sum_B, count_B, weights=None):
        """Mean (weighted-mean) g-value and its p-value: exact binomial for the mean, normal approximation when
        weighted."""
        f, M = self.g_rate, self.depth
        n = count_B.astype(jnp.float32)
        score = sum_B / (M * jnp.maximum(n, 1.0))
        if weights is None:
            return score, base.binomial_sf(sum_B, M * count_B, f)
        w = np.asarray(weights, np.float64)
        mean = f * w.sum() * n
        sd = jnp.sqrt(f * (1 - f) * float((w**2).sum()) * jnp.maximum(n, 1.0))
        return score, base.normal_sf((sum_B - mean) / sd)


def context_repetition_mask(token_ids_BT, *, ngram_len: int, context_history_size: int) -> Int[Array, "B G"]:
    """1 where the context of n-gram g did not occur among the previous `context_history_size` contexts, else 0,
    [B, T - ngram_len + 1]: `transformers`' `compute_context_repetition_mask`, from one sort per row."""
    ngram_len = base.check_int("ngram_len", ngram_len, 2, where="context_repetition_mask")
    base.check_int("context_history_size", context_history_size, 0, where="context_repetition_mask")
    tokens = jnp.asarray(token_ids_BT)
    if tokens.ndim != 2 or tokens.shape[1] < ngram_len:
        raise ValueError(
            f"context_repetition_mask: token_ids_BT {tokens.shape} must be [B, T >= ngram_len={ngram_len}]"
        )
    return _repetition_jit(tokens.astype(jnp.int32), ngram_len, context_history_size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _repetition_jit(tokens, ngram_len, context_history_size):
    B, T = tokens.shape
    C = ngram_len - 1
    G = T - C
    ctx_BGC = jnp.stack([tokens[:, i : i + G] for i in range(C)], axis=-1)
    hi, lo = hashing.accumulate(hashing.ones_like_hash((B, G)), ctx_BGC)
    rep = base.repeated_keys(hi, lo, jnp.ones((B, G), bool), context_history_size)
    return (~rep).astype(jnp.int32)
