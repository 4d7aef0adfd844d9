"""KGW green-list watermark (Kirchenbauer et al. 2023) as a `generate` logits processor.

Glossary: B batch, T time, S token-buffer slots, V vocab, H context width (`context_width`).

Each vocabulary token is green with probability γ given its context: green(v) = hash32(seed, v) < γ·2^32, where
the seed is
  - "left" (LeftHash): a hash of the key and the H previous tokens, in order;
  - "self" (SelfHash): the min-hash over the H previous tokens and the candidate itself, so the candidate salts its
    own list, and editing one context token changes the seed only when it held the minimum.
Generation adds δ to the green logits (after the temperature, before top-k/top-p). Detection counts green tokens
among the scored ones: under "not watermarked" (text independent of the key) each distinct (context, token) n-gram
is green with probability γ, so the count is Binomial(n, γ) and its upper tail is an exact p-value; repeated n-grams
break the independence and can be skipped (`ignore_repeated_ngrams`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from framework.watermark import base, hashing

SEEDINGS = ("left", "self")


@dataclasses.dataclass(frozen=True)
class KGW:
    """KGW processor: `generate(..., logits_processors=(KGW(cfg.vocab_size, gamma=0.25, delta=2.0),))`.

    vocab_size: the model's vocabulary (checked against the logits; the detector checks token ids against it).
    gamma: green fraction in (0, 1). delta: logit bias added to green tokens (>= 0).
    context_width: H >= 1 previous tokens seed the green list. seeding: "left" or "self" (see the module doc).
    key: the secret, an int in [0, 2^32).
    """

    vocab_size: int
    gamma: float = 0.25
    delta: float = 2.0
    context_width: int = 1
    seeding: str = "left"
    key: int = 15485863

    def __post_init__(self):
        base.check_int("vocab_size", self.vocab_size, 1, where="KGW")
        base.check_int("context_width", self.context_width, 1, where="KGW")
        base.check_int("key", self.key, 0, 2**32 - 1, where="KGW")
        if not 0.0 < float(self.gamma) < 1.0:
            raise ValueError(f"KGW: gamma={self.gamma!r}: expected the green fraction in (0, 1)")
        if not float(self.delta) >= 0.0 or float(self.delta) == float("inf"):
            raise ValueError(f"KGW: delta={self.delta!r}: expected a finite bias >= 0")
        if self.seeding not in SEEDINGS:
            raise ValueError(f"KGW: seeding={self.seeding!r}: expected one of {SEEDINGS}")

    @property
    def threshold(self) -> int:
        return min(max(int(round(float(self.gamma) * 2**32)), 1), 2**32 - 1)

    def is_green(self, ctx_XH: Int[Array, "*X H"], tok_X: Int[Array, " *X"]) -> Bool[Array, " *X"]:
        """Whether token `tok_X` is green after context `ctx_XH` (both broadcast over the leading axes X)."""
        k = jnp.uint32(self.key)
        if self.seeding == "left":
            seed = hashing.hash32(k, ctx_XH)
        else:
            ctx_min = jnp.min(hashing.mix32(ctx_XH.astype(jnp.uint32) ^ k), axis=-1)
            seed = jnp.minimum(ctx_min, hashing.mix32(jnp.asarray(tok_X).astype(jnp.uint32) ^ k))
        h = hashing.hash32(seed, jnp.asarray(tok_X)[..., None])
        return h < jnp.uint32(self.threshold)

    def __call__(self, logits_BV: Float[Array, "B V"], tokens_BS, lengths_B) -> Float[Array, "B V"]:
        base.check_vocab("KGW", self.vocab_size, logits_BV)
        ctx_BH, ok_B = base.decode_context(tokens_BS, lengths_B, self.context_width)
        green_BV = self.is_green(ctx_BH[:, None, :], jnp.arange(self.vocab_size, dtype=jnp.int32)[None, :])
        bias = jnp.float32(self.delta)
        return logits_BV + jnp.where(green_BV & ok_B[:, None], bias, 0.0).astype(logits_BV.dtype)

    def token_values(self, tokens_BT: Int[Array, "B T"]):
        """Per position: 1.0 if the token is green given its context else 0.0, the position's 64-bit n-gram key
        (hi, lo) for repeat checks, and whether it has a full context (t >= H)."""
        H = self.context_width
        B, T = tokens_BT.shape
        idx_TH = jnp.arange(T)[:, None] - H + jnp.arange(H)[None, :]
        ctx_BTH = tokens_BT[:, jnp.clip(idx_TH, 0, T - 1)]
        green_BT = self.is_green(ctx_BTH, tokens_BT)
        gram_BTH1 = jnp.concatenate([ctx_BTH, tokens_BT[..., None]], axis=-1)
        hi = hashing.hash32(jnp.uint32(0x51ED270B), gram_BTH1)
        lo = hashing.hash32(jnp.uint32(0x2545F491), gram_BTH1)
        full_BT = jnp.broadcast_to(jnp.arange(T)[None, :] >= H, (B, T))
        return green_BT.astype(jnp.float32), (hi, lo), full_BT

    def score_and_pvalue(self, sum_B, count_B):
        """z-score and exact binomial p-value of `sum_B` green tokens among `count_B` scored ones."""
        g = float(self.gamma)
        n = jnp.maximum(count_B.astype(jnp.float32), 1.0)
        z = (sum_B - g * n) / jnp.sqrt(n * g * (1.0 - g))
        return z, base.binomial_sf(sum_B, count_B, g)
