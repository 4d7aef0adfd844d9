"""Batch-invariant reductions: a row's result depends on that row alone, bit for bit, whatever else is computed with it.

Why: a cached decode step runs the model on one token per sequence ([B, 1]); the cache-free forward pass that
scores or re-checks the same tokens runs on [B, T]. Mathematically the last position's logits are the same. In fp32
they were not: XLA chooses how to reduce by the size of the whole array. XLA:CPU, for one, hands large reductions
(and the ops fused around them: the softmax's subtract-and-exp) to YNNPACK kernels and splits small ones into
32-wide windows, so the same row reduced alone and inside a batch could differ in its last bits. Through the
layers those bits became ~1e-5 gaps between cached and cache-free log-probs of a trained model, with identical
tokens (`scripts/bench/decode_parity_fp64.py` shows the gap vanishing in float64). RL and PRM pipelines that
compare sampler and scorer log-probs inherit such gaps.

How: the reductions on the decode path are written as fixed pairwise trees of elementwise ops (halves combined until
one element is left). XLA does not reassociate float additions (without fast-math), and no reduction is left for a
backend to route to a size-dependent kernel, so the order of every addition is fixed by the row length alone.
The tree is the one over the row zero-padded to a power of two (-inf for the max), so trailing masked or padded
entries are exact no-ops and a row of S cache slots and the same row inside a T-token pass give the same bits (the
padding itself is never built: entries it would meet pass through the first level unchanged). Pairwise summation
is also the accurate order: its error grows as O(log n) ulps, a sequential sum's as O(n).

Used by RMSNorm (`framework.models.lm`) and the reference attention's softmax (`framework.models.attention`); with
the output layer applied only at the positions a decoder needs (`lm.forward(logits_at=...)`), cached decoding
reproduced the cache-free pass bit for bit on XLA:CPU for 30 trained quickstart policies
(docs/results/quickstart.md; the reductions themselves are tested bitwise in tests/test_invariant.py). Matmuls stay
the backend's: XLA:CPU's output layer (vocab 24) gave different bits for 8 rows than for 8 x T rows, which
`logits_at` sidesteps by giving both passes the same [B, D] rows; the projections were invariant at the shapes
tested. Nothing here makes a matmul batch-invariant on every backend, and the Pallas kernels keep their own orders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pairwise(x: jax.Array, combine, identity: float) -> jax.Array:
    """The halving tree over the last axis, as if padded to a power of two with combine's identity.

    Level one pairs entry i with entry i + half (half: the largest power of two below n); entries without a partner
    would meet padding, an exact no-op, so they pass through and no padded copy of x is ever built. Every level
    after that halves a power of two. An empty axis reduces to the identity.
    """
    n = x.shape[-1]
    if n == 0:
        return jnp.full((*x.shape[:-1], 1), identity, x.dtype)
    if n > 1:
        half = 1 << ((n - 1).bit_length() - 1)
        paired = combine(x[..., : n - half], x[..., half:])
        x = paired if n == 2 * half else jnp.concatenate([paired, x[..., n - half : half]], axis=-1)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = combine(x[..., :half], x[..., half:])
    return x


def pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis (kept, size 1) by a fixed pairwise tree; batch-invariant (module docstring)."""
    return _pairwise(x, jnp.add, 0.0)


def pairwise_max(x: jax.Array) -> jax.Array:
    """Max over the last axis (kept, size 1) by a fixed pairwise tree. A max is exact in any order; the tree keeps
    the reduction (and the ops a compiler would fuse with it) away from size-dependent backend kernels."""
    return _pairwise(x, jnp.maximum, -jnp.inf)


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis with `pairwise_max` / `pairwise_sum`: each row's probabilities are bitwise the same
    whatever the batch, the number of query rows, or trailing masked entries. Gradients as `jax.nn.softmax`'s."""
    e = jnp.exp(x - jax.lax.stop_gradient(pairwise_max(x)))
    return e / pairwise_sum(e)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    p = softmax(x)
    # The tangent needs no invariance (training, not decoding), so it uses a plain reduction.
    return p, p * (t - jnp.sum(p * t, axis=-1, keepdims=True))
