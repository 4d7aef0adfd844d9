"""Masked next-token cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int


def next_token_loss(
    logits_BTV: Float[Array, "B T V"], tokens_BT: Int[Array, "B T"], loss_mask_BT: Float[Array, "B T"]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of predicting tokens[t] from position t-1, weighted by loss_mask[t].

    Returns (loss, metrics) where metrics hold the summed loss, the token count and the number of correct argmax
    predictions, so callers can aggregate exactly over several batches.
    """
    logits = logits_BTV[:, :-1].astype(jnp.float32)
    targets, w = tokens_BT[:, 1:], loss_mask_BT[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    n = jnp.sum(w)
    total = jnp.sum(ce * w)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * w)
    return total / jnp.maximum(n, 1.0), {"loss_sum": total, "tokens": n, "correct": correct}
