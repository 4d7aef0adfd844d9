"""Aaronson's Gumbel / exponential-minimum watermark as a `generate` sampler: distortion-free sampling from keyed
uniforms.

Glossary: B batch, T time, S token-buffer slots, V vocab, H context width (`context_width`), W history window.

Each candidate v after a context gets a keyed uniform u_v = U(hash(key, context, v)) in (0, 1); the sampler emits
argmax_v u_v^(1/p_v) = argmax_v [log p_v - log(-log u_v)], the Gumbel-max trick with noise fixed by the key. Over
random keys the u_v are independent uniforms, so the emitted token is distributed exactly as p: distortion-free.
The sampler draws from the logits it is handed (after the temperature, processors and top-k/top-p), so it composes
with them. A context that repeats one of the previous `context_history_size` contexts is drawn with the row's own
key instead (otherwise the text would copy its own earlier continuation).

Detection: Σ -log(1 - u_t) over n scored tokens; without the key each term is Exp(1) for distinct n-grams, so the
sum is Gamma(n, 1) and its upper tail is an exact p-value. Repeated (context, token) n-grams are skipped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from framework.inference import sampling
from framework.watermark import base, hashing


@dataclasses.dataclass(frozen=True)
class Gumbel:
    """Gumbel sampler: `generate(..., temperature=1.0, sampler=Gumbel(cfg.vocab_size), rng=key)`.

    vocab_size: the model's vocabulary. context_width: H >= 1 previous tokens seed the uniforms. key: the secret,
    an int in [0, 2^32). context_history_size: repeated contexts within this many previous positions are sampled
    without the watermark (0: never).
    """

    vocab_size: int
    context_width: int = 4
    key: int = 15485863
    context_history_size: int = 0

    def __post_init__(self):
        base.check_int("vocab_size", self.vocab_size, 1, where="Gumbel")
        base.check_int("context_width", self.context_width, 1, where="Gumbel")
        base.check_int("key", self.key, 0, 2**32 - 1, where="Gumbel")
        base.check_int("context_history_size", self.context_history_size, 0, where="Gumbel")

    def uniforms(self, ctx_XH: Int[Array, "*X H"], tok_X: Int[Array, " *X"]) -> Float[Array, " *X"]:
        """The keyed uniform u of token `tok_X` after context `ctx_XH` (broadcast over the leading axes)."""
        seed = hashing.hash32(jnp.uint32(self.key), ctx_XH)
        return hashing.uniform_from_hash(hashing.hash32(seed, jnp.asarray(tok_X)[..., None]))

    def __call__(self, logits_BV: Float[Array, "B V"], tokens_BS, lengths_B, keys_B) -> Int[Array, " B"]:
        base.check_vocab("Gumbel", self.vocab_size, logits_BV)
        ctx_BH, ok_B = base.decode_context(tokens_BS, lengths_B, self.context_width)
        u_BV = self.uniforms(ctx_BH[:, None, :], jnp.arange(self.vocab_size, dtype=jnp.int32)[None, :])
        logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
        marked_B = jnp.argmax(logp_BV - jnp.log(-jnp.log(u_BV)), axis=-1).astype(jnp.int32)
        plain_B = sampling.categorical_rows(keys_B, logits_BV)
        repeated_B = base.repeated_decode_context(tokens_BS, lengths_B, self.context_width, self.context_history_size)
        return jnp.where(ok_B & ~repeated_B, marked_B, plain_B)

    def token_values(self, tokens_BT: Int[Array, "B T"]):
        """Per position: -log(1 - u_t), the 64-bit key of its (context, token) n-gram, and whether t >= H."""
        H = self.context_width
        B, T = tokens_BT.shape
        idx_TH = jnp.arange(T)[:, None] - H + jnp.arange(H)[None, :]
        ctx_BTH = tokens_BT[:, jnp.clip(idx_TH, 0, T - 1)]
        u_BT = self.uniforms(ctx_BTH, tokens_BT)
        gram = jnp.concatenate([ctx_BTH, tokens_BT[..., None]], axis=-1)
        hi = hashing.hash32(jnp.uint32(0x51ED270B), gram)
        lo = hashing.hash32(jnp.uint32(0x2545F491), gram)
        full_BT = jnp.broadcast_to(jnp.arange(T)[None, :] >= H, (B, T))
        return -jnp.log1p(-u_BT), (hi, lo), full_BT

    def score_and_pvalue(self, sum_B, count_B):
        """Mean of -log(1 - u) (1 without the watermark) and the exact Gamma(n, 1) p-value of the sum."""
        return sum_B / jnp.maximum(count_B.astype(jnp.float32), 1.0), base.gamma_sf(sum_B, count_B)
