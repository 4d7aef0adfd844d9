"""Cache-free reference decoder: the oracle `generate` is tested against.

Glossary: B batch, T time, N max_new_tokens, V vocab.

Deliberately plain: a Python loop over steps; each step re-runs the full forward pass (`lm.apply`, no cache) over
every sequence's whole prefix, held in a fixed [B, P + N] buffer (P = longest prompt) so one compiled program
serves every step. Causality makes the positions past a sequence's current end irrelevant to its last logits
(tested in tests/test_lm.py). The last-position logits [B, V] are sampled with the same `sampling` functions and
per-step keys (`fold_in(rng, i)`) as `generate`. Rows that have stopped contribute zero logits, which leaves the
other rows' draws unchanged (the categorical noise depends only on the key and the [B, V] shape). O(N) full
forward passes: for tests and small-scale checks.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from framework.inference import sampling
from framework.inference.generate import GenerateOutput, validate_request
from framework.models import lm


@functools.partial(jax.jit, static_argnames="cfg")
def _last_logits(
    params: lm.Params, tokens_BT: Int[Array, "B T"], last_B: Int[Array, "B"], cfg: lm.LMConfig
) -> Float[Array, "B V"]:
    # Jitted only to dispatch the model as one program (eager apply re-traces its layer scan on every call).
    return lm.apply(params, tokens_BT, cfg, logits_at=last_B[:, None])[:, 0]


def reference_generate(
    params: lm.Params,
    cfg: lm.LMConfig | Mapping[str, Any],
    prompts: Sequence[Any] | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    rng: jax.Array | None = None,
) -> GenerateOutput:
    """Same contract and outputs as `framework.inference.generate`, computed without a KV cache."""
    req = validate_request(
        cfg,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        rng=rng,
    )
    cfg, B, N = req.cfg, len(req.prompts), int(max_new_tokens)
    lens_B = np.array([len(p) for p in req.prompts], np.int32)
    buf_BT = np.full((B, int(lens_B.max()) + N), cfg.pad_id, np.int32)
    for b, p in enumerate(req.prompts):
        buf_BT[b, : len(p)] = p
    tokens_BN = np.full((B, N), cfg.pad_id, np.int32)
    logprobs_BN = np.zeros((B, N), np.float32)
    lengths_B = np.zeros((B,), np.int32)
    done_B = np.zeros((B,), bool)
    for i in range(N):
        if done_B.all():
            break
        logits_BV = _last_logits(params, jnp.asarray(buf_BT), jnp.asarray(lens_B - 1), cfg)
        logits_BV = jnp.where(jnp.asarray(done_B)[:, None], 0.0, logits_BV)
        key = None if req.temperature == 0.0 else sampling.step_key(rng, i)
        tok_B = sampling.sample(logits_BV, key, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)
        lp_B = sampling.token_logprobs(logits_BV, tok_B)
        tok_B, lp_B = np.asarray(tok_B), np.asarray(lp_B)
        for b in np.flatnonzero(~done_B):
            tokens_BN[b, i], logprobs_BN[b, i] = tok_B[b], lp_B[b]
            lengths_B[b] += 1
            buf_BT[b, lens_B[b]] = tok_B[b]
            lens_B[b] += 1
            done_B[b] = int(tok_B[b]) in req.stop_tokens
    return GenerateOutput(jnp.asarray(tokens_BN), jnp.asarray(logprobs_BN), jnp.asarray(lengths_B))
