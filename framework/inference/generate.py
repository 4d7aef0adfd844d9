"""Batched generation over a KV cache: one jit-compiled prefill + `lax.while_loop` decode for ragged prompts.

Glossary: B batch, T padded prompt time, S cache slots (token-buffer slots T + N for processors), N max_new_tokens,
V vocab, E stop ids.

`generate(params, cfg, prompts, max_new_tokens=...)` right-pads the prompts to a bucketed length, runs the prompt
block through the model once (writing the cache), takes each prompt's first new token from the logits at its last
real position, then decodes one token per step for every sequence at its own position (prompt_len + i - 1 for
step i) until all sequences have stopped or N tokens exist. Nothing runs in Python per token.

Hooks: `logits_processors` (`fn(logits_BV, tokens_BS, lengths_B) -> logits_BV`, applied in order after the
temperature and before top-k/top-p) and a `sampler` (`fn(logits_BV, tokens_BS, lengths_B, keys_B) -> tokens_B`,
replacing the draw) see a [B, T + N] buffer of each row's prompt followed by its tokens so far, valid up to
`lengths_B` (`request.filler_id` after); the loop carries that buffer only when a processor or sampler is present.
`interventions` (hookpoint name -> fn, as in `lm.forward`) apply in the prefill and in every decode step.
`prompt_embeds` replace the prompts' embedding lookup in the prefill (soft or image tokens); `prefix_len` gives the
prefill a prefix-LM mask. Decode steps embed their tokens and attend causally, which already sees the whole prefix.
Arguments are checked before any jit by `framework.inference.request.validate_request`. No pad token is needed:
`lengths` marks where each row's output ends, and the tokens after a stop hold `pad_value` (default: the model's
pad id, or -1 for a model without one).

Randomness is per row (`sampling.row_keys`): `rng` is one key (row b draws from `fold_in(rng, b)`) or a batch of B
keys, and step i of row b draws with `fold_in(row_key_b, i)` and its own categorical. A row's sample therefore
depends only on its key, its prompt and the hooks, never on the batch size, its position or the other rows (up to
the backend's rounding of the model's batched matmuls, which could flip a draw sitting on a boundary).

Compile reuse: the jitted function is keyed on (cfg, N, greedy-or-sampled, top-k present, top-p present, cache
spec, processors, sampler, interventions) and the shapes of its array arguments: batch B, padded prompt length T,
padded stop-id count, key shape (one key or B keys), and whether prompt embeddings (and of which dtype) or a prefix
come. T is bucketed (`bucket_length`) so batches with similar prompt lengths share one compile; temperature, top_k
and top_p values are traced, so changing them never recompiles. Processors, sampler and intervention functions are
compared by `==` (by identity for plain functions and `functools.partial`): build them once and reuse them, or use
frozen dataclasses, which compare by value. B is not bucketed: padded rows would cost decode compute, and callers
that want fewer compiles (`LMPolicy`) pad their own batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from framework.inference import kv_cache as kvc
from framework.inference import sampling
from framework.inference.request import (  # noqa: F401 (MIN_BUCKET, Request, bucket_length: re-exported)
    MIN_BUCKET,
    Interventions,
    Request,
    bucket_length,
    filler_id,
    prompt_block,
    validate_request,
)
from framework.models import lm


class GenerateOutput(NamedTuple):
    """Generated tokens with their log-probabilities under the model's distribution and under the sampled one.

    tokens:   int32 [B, N] new tokens only; `pad_value` after a sequence's stop token (valid: the first `lengths`).
    logprobs: float32 [B, N] log_softmax of the raw logits (temperature 1, no processors, no top-k/top-p) at each
              generated token, i.e. what a verifier or scorer needs regardless of how the token was sampled; 0 after
              the stop.
    lengths:  int32 [B] number of generated tokens, the stop token included.
    processed_logprobs: float32 [B, N] log_softmax of the logits the draw used (after temperature, processors,
              top-k/top-p; greedy: processors only) at each generated token; equal to `logprobs` for greedy without
              processors; -inf where a sampler picked a token the processed distribution excludes; 0 after the stop.
    """

    tokens: Int[Array, "B N"]
    logprobs: Float[Array, "B N"]
    lengths: Int[Array, " B"]
    processed_logprobs: Float[Array, "B N"]


def _decode_step(params, cfg, tok_B, pos_B, cache, interventions):
    out = lm.forward(
        params, tok_B[:, None], cfg, positions_BT=pos_B[:, None], kv_cache=cache, interventions=interventions
    )
    return out.logits[:, 0], out.kv_cache


class CacheSpec(NamedTuple):
    """Static description of the cache `generate` builds: layout, dtype, slots per sequence, paging."""

    layout: str  # "dense" | "paged"
    dtype: str | None  # None = the model's compute dtype; "int8" = quantised with per-token, per-head scales
    seq_len: int  # slots per sequence (dense) / page-table span (paged, a multiple of page_size)
    page_size: int
    num_pages: int  # paged pool size


def _grab_pages(cache: kvc.KVCache, need_B, pos_B):
    """Gives each row with need_B a fresh page for position pos_B; returns (cache, ok)."""
    pool, pages_B1, ok = kvc.allocate(cache.pool, need_B, 1)
    C = cache.page_size
    rows = jnp.arange(need_B.shape[0])
    col_B = jnp.clip(pos_B // C, 0, cache.page_table.shape[1] - 1)
    table = cache.page_table.at[rows, col_B].set(jnp.where(need_B, pages_B1[:, 0], cache.page_table[rows, col_B]))
    return cache.replace(page_table=table, pool=pool), ok


def _free_rows(cache: kvc.KVCache, rows_B):
    """Returns the pages of the rows in rows_B to the pool; their later writes are dropped (table entries -1)."""
    freed = jnp.where(rows_B[:, None], cache.page_table, -1)
    return cache.replace(
        pool=kvc.release(cache.pool, freed), page_table=jnp.where(rows_B[:, None], -1, cache.page_table)
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "spec",
        "greedy",
        "use_top_k",
        "use_top_p",
        "processors",
        "sampler",
        "interventions",
    ),
)
def _generate_jit(
    params,
    tokens_BT,
    embeds_BTD,
    prefix_B,
    prompt_lens_B,
    stop_ids_E,
    rng,
    temperature,
    top_k,
    top_p,
    pad_value,
    *,
    cfg: lm.LMConfig,
    max_new_tokens: int,
    spec: CacheSpec,
    greedy: bool,
    use_top_k: bool,
    use_top_p: bool,
    processors: tuple[sampling.LogitsProcessor, ...],
    sampler: sampling.Sampler | None,
    interventions: Interventions,
):
    B, T = tokens_BT.shape
    N = max_new_tokens
    rows_B = jnp.arange(B)
    hooked = bool(processors) or sampler is not None  # only then does the loop carry the [B, T + N] token buffer
    # Greedy without processors draws from the raw logits: its processed log-probs are its log-probs, no 2nd buffer.
    same_logprobs = greedy and not processors
    keys_B = sampling.row_keys(rng, B) if (not greedy or sampler is not None) else None
    iv = dict(interventions) or None

    def pick(logits_BV, step, buf_BS, valid_B):
        tok_B, x_BV = sampling.choose_tokens(
            logits_BV,
            buf_BS,
            valid_B,
            None if keys_B is None else sampling.step_keys(keys_B, step),
            greedy=greedy,
            temperature=temperature,
            top_k=top_k if use_top_k else None,
            top_p=top_p if use_top_p else None,
            processors=processors,
            sampler=sampler,
        )
        lp_B = sampling.token_logprobs(logits_BV, tok_B)
        return tok_B, lp_B, lp_B if same_logprobs else sampling.token_logprobs(x_BV, tok_B)

    def is_stop(tok_B):
        return jnp.any(tok_B[:, None] == stop_ids_E[None, :], axis=-1)

    # Prefill: the whole padded block at positions 0..T-1. Dense: pad slots lie past every real query's position and
    # are overwritten by decode before any query can see them. Paged: each row first gets the pages its prompt
    # covers; pad positions past them have no page and their writes are dropped.
    paged = spec.layout == "paged"
    # Unstacked layers: each layer's weights are sliced once here, not re-sliced (copied) at every token by the
    # layer scan, and each layer's cache is its own loop-carried buffer, updated in place.
    params = lm.unstack_layers(params, cfg)
    cache = kvc.unstack(
        kvc.init_cache(
            cfg, B, spec.seq_len, spec.dtype, spec.layout, page_size=spec.page_size, num_pages=spec.num_pages
        )
    )
    ok = jnp.bool_(True)
    if paged:
        C = spec.page_size
        pool, table, ok = kvc.allocate(cache.pool, (prompt_lens_B + C - 1) // C, cache.page_table.shape[1])
        cache = cache.replace(pool=pool, page_table=table)
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = lm.forward(
        params,
        None if embeds_BTD is not None else tokens_BT,
        cfg,
        embeds_BTD=embeds_BTD,
        prefix_len_B=prefix_B,
        positions_BT=pos_BT,
        kv_cache=cache,
        logits_at=(prompt_lens_B - 1)[:, None],
        interventions=iv,
    )
    # The prompt block already holds the filler past each prompt, so prompt + filler is the buffer's start.
    filler = filler_id(cfg)
    buf_BS = jnp.concatenate([tokens_BT, jnp.full((B, N), filler, jnp.int32)], axis=1) if hooked else None
    tok_B, lp_B, plp_B = pick(out.logits[:, 0], 0, buf_BS, prompt_lens_B)
    state = {
        "i": jnp.int32(1),
        "cache": _free_rows(out.kv_cache, is_stop(tok_B)) if paged else out.kv_cache,
        "tokens": jnp.full((B, N), pad_value, jnp.int32).at[:, 0].set(tok_B),
        "logprobs": jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp_B),
        "prev": tok_B,
        "done": is_stop(tok_B),
        "lengths": jnp.ones((B,), jnp.int32),
        "ok": ok,
    }
    if not same_logprobs:
        state["processed"] = jnp.zeros((B, N), jnp.float32).at[:, 0].set(plp_B)
    if hooked:
        state["buf"] = buf_BS.at[rows_B, prompt_lens_B].set(tok_B)

    def cond(s):
        return (s["i"] < N) & ~jnp.all(s["done"]) & s["ok"]

    def body(s):
        i, cache, done_B, ok = s["i"], s["cache"], s["done"], s["ok"]
        pos_B = prompt_lens_B + i - 1
        if paged:  # a row crossing into a new page takes one from the pool; finished rows hold none
            cache, ok = _grab_pages(cache, (pos_B % spec.page_size == 0) & ~done_B, pos_B)
        # Finished rows keep computing (the batch moves in lockstep) but their outputs are discarded.
        logits_BV, cache = _decode_step(params, cfg, s["prev"], pos_B, cache, iv)
        # A live row has i generated tokens, so its valid length in the buffer is prompt_len + i.
        tok_B, lp_B, plp_B = pick(logits_BV, i, s.get("buf"), prompt_lens_B + s["lengths"])
        new = dict(s, i=i + 1, cache=cache, prev=tok_B, ok=ok)
        new["tokens"] = s["tokens"].at[:, i].set(jnp.where(done_B, pad_value, tok_B))
        new["logprobs"] = s["logprobs"].at[:, i].set(jnp.where(done_B, 0.0, lp_B))
        if not same_logprobs:
            new["processed"] = s["processed"].at[:, i].set(jnp.where(done_B, 0.0, plp_B))
        if hooked:
            new["buf"] = s["buf"].at[rows_B, prompt_lens_B + i].set(jnp.where(done_B, filler, tok_B))
        new["lengths"] = s["lengths"] + (~done_B).astype(jnp.int32)
        new["done"] = done_B | is_stop(tok_B)
        if paged:  # pages of rows that just stopped go back to the pool for the rows still running
            new["cache"] = _free_rows(cache, new["done"] & ~done_B)
        return new

    s = jax.lax.while_loop(cond, body, state)
    # None when equal to logprobs: `generate` fills it in, so the program does not copy one buffer to two outputs.
    return GenerateOutput(s["tokens"], s["logprobs"], s["lengths"], s.get("processed")), s["ok"]


def generate(
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
    kv_layout: str = "dense",
    kv_dtype: str | None = None,
    page_size: int = 16,
    num_pages: int | None = None,
) -> GenerateOutput:
    """Continues each prompt by up to `max_new_tokens` tokens with one compiled prefill + decode loop.

    Args:
      params: LM parameters (`lm.init` layout).
      cfg: an `lm.LMConfig` or a ConfigDict/dict of its fields.
      prompts: a list of 1-D int token arrays (lengths may differ) or a 2-D [B, T] array of equal-length prompts;
        None with `prompt_embeds` (processors then see `request.filler_id` placeholders in the prompt's place).
      max_new_tokens: N; prompt length + N must fit in `cfg.max_seq_len`.
      temperature: 0 = greedy (argmax of the processed logits; top_k/top_p then ignored), > 0 samples, needs `rng`.
      top_k: keep the k most likely tokens before sampling.
      top_p: nucleus sampling; keep the smallest most-likely set with probability >= top_p.
      stop_tokens: ids that end a sequence (kept as its last token); None = `cfg.eos_ids`, () = never stop.
      rng: one PRNG key (row b draws from `fold_in(rng, b)`) or a batch of B keys, one per prompt; step i of a row
        draws with `fold_in(row_key, i)`, so a row's sample depends only on its key, prompt and hooks.
      logits_processors: a tuple of hashable `fn(logits_BV, tokens_BS, lengths_B) -> logits_BV`, applied in order
        after the temperature and before top-k/top-p. `tokens_BS` [B, T + N] holds each row's prompt then its tokens
        so far, valid up to `lengths_B` (prompt length + tokens generated so far), `request.filler_id` after.
      sampler: a hashable `fn(logits_BV, tokens_BS, lengths_B, keys_B) -> tokens_B` that replaces the draw; it sees
        the processed logits (after temperature, processors, top-k/top-p; greedy: the processors only) and this
        step's per-row keys. Needs `rng`.
      interventions: hookpoint name -> hashable fn (as in `lm.forward`), applied in the prefill and every step.
      prompt_embeds: a [B, T, D] float array or a list of [T_i, D] arrays that replace the prompts' embedding lookup
        in the prefill (as `lm.forward(embeds_BTD=)`: in the residual stream's scale, see `lm.embed`); the decode
        steps embed the generated tokens as usual. With `prompts` too, lengths must match.
      prefix_len: [B] ints in [0, prompt length]: the prefill's prefix-LM mask (full attention among a row's first
        prefix_len positions, causal after); decoding is causal, which already sees the whole prefix.
      pad_value: the id written after a row's stop in `tokens` (`lengths` marks the end either way); None = the
        model's pad id, or -1 (no token) for a model without one (`cfg.pad_id` None).
      kv_layout: "dense" ([B, S] slots per layer) or "paged" (a pool of `page_size`-token pages handed out from a
        free list as rows grow and returned when a row stops, so `num_pages` may be below the worst case B * S / C).
      kv_dtype: cache dtype; None = the model's compute dtype, "int8" = per-token, per-head quantised.
      page_size, num_pages: paging (paged only); num_pages defaults to the worst case. Running out raises.

    Returns:
      GenerateOutput(tokens [B, N] int32, logprobs [B, N] float32, lengths [B] int32, processed_logprobs [B, N]
      float32): logprobs are under the unmodified model distribution (log_softmax of raw logits), whatever sampled
      them; processed_logprobs under the distribution the draw used.
    """
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
    cfg, lens = req.cfg, [p.size for p in req.prompts]
    tokens_BT, embeds_BTD = prompt_block(req)
    T = tokens_BT.shape[1]
    # Decode writes positions up to max(lens) + N - 2; the prefill block needs T slots. A multiple of 16 lets the
    # decode kernel read a dense cache in 16-token (or larger) pages.
    cache_len = min(-(-(T + max_new_tokens) // 16) * 16, cfg.max_seq_len)
    spec = _cache_spec(cfg, len(lens), cache_len, kv_layout, kv_dtype, page_size, num_pages)
    # Stop ids padded with -1 (never a token) to a bucketed count, so stop sets of similar size share a compile.
    stop_E = np.full(bucket_length(len(req.stop_tokens) or 1, 1 << 30, minimum=4), -1, np.int32)
    stop_E[: len(req.stop_tokens)] = req.stop_tokens
    greedy = req.greedy
    # Host values go to the jitted call as numpy: each eager jnp conversion was a dispatch of its own (~2 ms a call).
    out, ok = _generate_jit(
        params,
        tokens_BT,
        embeds_BTD,
        req.prefix_len,
        np.asarray(lens, np.int32),
        stop_E,
        rng if req.needs_keys else _unused_key(),
        np.float32(req.temperature or 1.0),
        np.int32(req.top_k or 1),
        np.float32(req.top_p or 1.0),
        np.int32(req.pad_value),
        cfg=cfg,
        max_new_tokens=int(max_new_tokens),
        spec=spec,
        greedy=greedy,
        use_top_k=req.top_k is not None and not greedy,
        use_top_p=req.top_p is not None and not greedy,
        processors=req.processors,
        sampler=req.sampler,
        interventions=req.interventions,
    )
    if not bool(ok):
        worst = len(lens) * spec.seq_len // spec.page_size
        raise RuntimeError(
            f"generate: the paged KV cache ran out of pages (num_pages={spec.num_pages}, page_size={spec.page_size}, "
            f"batch={len(lens)}); pass a larger num_pages (the worst case is {worst})"
        )
    return out if out.processed_logprobs is not None else out._replace(processed_logprobs=out.logprobs)


@functools.cache
def _unused_key() -> jax.Array:
    """The PRNG key greedy decoding passes (and never reads), made once."""
    return jax.random.key(0)


def _cache_spec(cfg, batch, cache_len, layout, dtype, page_size, num_pages) -> CacheSpec:
    if layout not in kvc.LAYOUTS:
        raise ValueError(f"generate: kv_layout={layout!r}: expected one of {kvc.LAYOUTS}")
    if dtype is not None and str(dtype) not in kvc.KV_DTYPES:
        raise ValueError(f"generate: kv_dtype={dtype!r}: expected None or one of {kvc.KV_DTYPES}")
    if layout == "dense":
        return CacheSpec("dense", dtype, cache_len, 16, 0)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"generate: page_size must be an int >= 1, got {page_size!r}")
    span = -(-cache_len // page_size) * page_size
    worst = batch * span // page_size
    if num_pages is None:
        num_pages = worst
    if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
        raise ValueError(f"generate: num_pages must be None or an int >= 1, got {num_pages!r}")
    return CacheSpec("paged", dtype, span, page_size, min(num_pages, worst))
