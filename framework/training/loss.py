"""Masked next-token cross-entropy, and per-sequence log-probabilities under the same convention.

Glossary: B batch, T tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from framework.models import lm


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


def sequence_logprobs(
    params: lm.Params,
    cfg: lm.LMConfig | Mapping[str, Any],
    tokens_BT: Int[Array, "B T"],
    loss_mask_BT: Float[Array, "B T"],
    **forward_kw,
) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """Each sequence's log-probability under the LM: (sum over t of loss_mask[t] * log p(tokens[t] | tokens[<t]),
    sum of loss_mask[t]), both [B] float32, over t >= 1.

    The convention of `next_token_loss`: the logits at t-1 score token t and loss_mask[:, 0] is ignored (nothing
    predicts the first token), so `-sum(logp_sum) / sum(n_tokens)` is that loss. `forward_kw` go to `lm.forward`
    (positions_BT, segment_ids_BT, interventions, prefix_len_B, ...); with `embeds_BTD` (soft inputs, e.g. image
    tokens) the model reads the embeddings and `tokens_BT` are only the targets. Jit it with `cfg` static; under a
    mesh the logits shard as in the training loss (batch over the data axes). DPO-style losses, routing confidence
    and watermark quality are functions of these sums.
    """
    inputs_BT = None if forward_kw.get("embeds_BTD") is not None else tokens_BT
    logits_BTV = lm.forward(params, inputs_BT, cfg, **forward_kw).logits[:, :-1].astype(jnp.float32)
    logp_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:])
    w_BT = loss_mask_BT[:, 1:].astype(jnp.float32)
    return jnp.sum(logp_BT * w_BT, axis=-1), jnp.sum(w_BT, axis=-1)


def lm_loss_fn(cfg: lm.LMConfig):
    """`loss_fn(params, batch) -> (loss, aux)` of `next_token_loss` on a batch of `tokens` and `loss_mask` (packed
    batches also carry `positions` and `segment_ids`): the loss every LM task on the one loop trains with."""

    def loss_fn(params, batch):
        logits = lm.apply(
            params, batch["tokens"], cfg, positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids")
        )
        return next_token_loss(logits, batch["tokens"], batch["loss_mask"])

    return loss_fn


def held_out_eval(loss_fn, batches):
    """`eval_fn(state) -> {"loss", "token_accuracy"}` over fixed held-out `batches` (host arrays: under several
    processes jit treats them as the same replicated value on every host), from `loss_fn`'s token-count aux."""
    scored = jax.jit(lambda p, b: loss_fn(p, b)[1])

    def eval_fn(state):
        sums = [jax.device_get(scored(state.params, b)) for b in batches]
        n = sum(float(s["tokens"]) for s in sums)
        return {
            "loss": sum(float(s["loss_sum"]) for s in sums) / n,
            "token_accuracy": sum(float(s["correct"]) for s in sums) / n,
        }

    return eval_fn
