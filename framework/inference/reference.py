"""Cache-free reference decoder: the oracle `generate` is tested against.

Glossary: B batch, T time, S token-buffer slots, N max_new_tokens, V vocab, D model width.

Deliberately plain: a Python loop over steps; each step re-runs the full forward pass (`lm.apply`, no cache) over
every sequence's whole prefix, held in a fixed [B, P + N] buffer (P = longest prompt) so one compiled program serves
every step, with the same `interventions`, the `prefix_len` mask, and `prompt_embeds` in the prompt's positions (the
generated tokens' lookup after them). Causality makes the positions past a sequence's current end irrelevant to its
last logits (tested in tests/test_lm.py). The last-position logits [B, V] go through the same
`sampling.choose_tokens` as in `generate`: the same processors, sampler, per-row keys (`sampling.row_keys`, then
`fold_in(row_key, i)` at step i) and the same [B, T + N] token buffer for the hooks (`request.token_buffer`, T the
bucketed prompt length), so both decoders hand the hooks identical inputs. Draws are per row, so the rows that have
stopped (their logits are computed and discarded) never affect the others. O(N) full forward passes: for tests and
small-scale checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from framework.inference import sampling
from framework.inference.generate import GenerateOutput
from framework.inference.request import Interventions, filler_id, token_buffer, validate_request
from framework.models import lm


@functools.partial(jax.jit, static_argnames=("cfg", "interventions"))
def _last_logits(
    params: lm.Params,
    tokens_BT: Int[Array, "B T"],
    last_B: Int[Array, " B"],
    prompt_embeds_BTD: Float[Array, "B T D"] | None,
    prompt_lens_B: Int[Array, " B"],
    prefix_B: Int[Array, " B"] | None,
    cfg: lm.LMConfig,
    interventions: Interventions = (),
) -> Float[Array, "B V"]:
    # Jitted only to dispatch the model as one program (eager apply re-traces its layer scan on every call).
    iv = dict(interventions) or None
    kw = dict(logits_at=last_B[:, None], interventions=iv, prefix_len_B=prefix_B)
    if prompt_embeds_BTD is None:
        return lm.apply(params, tokens_BT, cfg, **kw)[:, 0]
    # The prompt's positions take the given embeddings, the generated tokens their lookup (as the cached decode).
    in_prompt_BT1 = (jnp.arange(tokens_BT.shape[1])[None, :] < prompt_lens_B[:, None])[:, :, None]
    embeds_BTD = jnp.where(in_prompt_BT1, prompt_embeds_BTD, lm.embed(params, tokens_BT, cfg))
    return lm.apply(params, None, cfg, embeds_BTD=embeds_BTD, **kw)[:, 0]


def reference_generate(
    params: lm.Params,
    cfg: lm.LMConfig | Mapping[str, Any],
    prompts: Sequence[Any] | np.ndarray | None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    rng: jax.Array | None = None,
    logits_processors: Sequence[sampling.LogitsProcessor] = (),
    sampler: sampling.Sampler | None = None,
    interventions: Mapping[str, Callable] | None = None,
    prompt_embeds: Any = None,
    prefix_len: Sequence[int] | np.ndarray | None = None,
    pad_value: int | None = None,
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
        logits_processors=logits_processors,
        sampler=sampler,
        interventions=interventions,
        prompt_embeds=prompt_embeds,
        prefix_len=prefix_len,
        pad_value=pad_value,
    )
    cfg, B, N = req.cfg, len(req.prompts), int(max_new_tokens)
    lens_B = np.array([len(p) for p in req.prompts], np.int32)
    prompt_lens_B = lens_B.copy()
    buf_BT = np.full((B, int(lens_B.max()) + N), filler_id(cfg), np.int32)
    for b, p in enumerate(req.prompts):
        buf_BT[b, : len(p)] = p
    embeds_BTD = None
    if req.prompt_embeds is not None:
        dtype = np.result_type(*[e.dtype for e in req.prompt_embeds])
        embeds_BTD = np.zeros((*buf_BT.shape, cfg.d_model), dtype)
        for b, e in enumerate(req.prompt_embeds):
            embeds_BTD[b, : e.shape[0]] = e
    hooked = bool(req.processors) or req.sampler is not None
    hook_buf_BS = token_buffer(req, N) if hooked else None
    keys_B = sampling.row_keys(rng, B) if req.needs_keys else None
    tokens_BN = np.full((B, N), req.pad_value, np.int32)
    logprobs_BN = np.zeros((B, N), np.float32)
    processed_BN = np.zeros((B, N), np.float32)
    lengths_B = np.zeros((B,), np.int32)
    done_B = np.zeros((B,), bool)
    for i in range(N):
        if done_B.all():
            break
        logits_BV = _last_logits(
            params, buf_BT, lens_B - 1, embeds_BTD, prompt_lens_B, req.prefix_len, cfg, req.interventions
        )
        tok_B, x_BV = sampling.choose_tokens(
            logits_BV,
            None if hook_buf_BS is None else jnp.asarray(hook_buf_BS),
            jnp.asarray(lens_B) if hooked else None,
            None if keys_B is None else sampling.step_keys(keys_B, i),
            greedy=req.greedy,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            processors=req.processors,
            sampler=req.sampler,
        )
        lp_B = np.asarray(sampling.token_logprobs(logits_BV, tok_B))
        plp_B = np.asarray(sampling.token_logprobs(x_BV, tok_B))
        tok_B = np.asarray(tok_B)
        for b in np.flatnonzero(~done_B):
            tokens_BN[b, i], logprobs_BN[b, i], processed_BN[b, i] = tok_B[b], lp_B[b], plp_B[b]
            lengths_B[b] += 1
            buf_BT[b, lens_B[b]] = tok_B[b]
            if hooked:
                hook_buf_BS[b, lens_B[b]] = tok_B[b]
            lens_B[b] += 1
            done_B[b] = int(tok_B[b]) in req.stop_tokens
    return GenerateOutput(
        jnp.asarray(tokens_BN), jnp.asarray(logprobs_BN), jnp.asarray(lengths_B), jnp.asarray(processed_BN)
    )
