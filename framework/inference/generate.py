"""Batched generation over a KV cache: one jit-compiled prefill + `lax.while_loop` decode for ragged prompts.

Glossary: B batch, T padded prompt time, S cache slots, N max_new_tokens, V vocab, E stop ids.

`generate(params, cfg, prompts, max_new_tokens=...)` right-pads the prompts to a bucketed length, runs the prompt
block through the model once (writing the cache), takes each prompt's first new token from the logits at its last
real position, then decodes one token per step for every sequence at its own position (prompt_len + i - 1 for
step i) until all sequences have stopped or N tokens exist. Nothing runs in Python per token.

Compile reuse: the jitted function is keyed on (cfg, N, greedy-or-sampled, top-k present, top-p present, cache
length) and the shapes of its array arguments: batch B, padded prompt length T, padded stop-id count, key type.
T is bucketed (`bucket_length`) so batches with similar prompt lengths share one compile; temperature, top_k and
top_p values are traced, so changing them never recompiles. B is not bucketed: a categorical draw depends on the
batch shape, and keeping B exact makes `generate` reproduce `reference_generate` sample for sample.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from framework.inference import kv_cache as kvc
from framework.inference import sampling
from framework.models import lm
from framework.tasks.tokenizer import check_token_ids

MIN_BUCKET = 16


class GenerateOutput(NamedTuple):
    """Generated tokens with their log-probabilities under the model's unmodified distribution.

    tokens:   int32 [B, N] new tokens only; `cfg.pad_id` after a sequence's stop token.
    logprobs: float32 [B, N] log_softmax of the raw logits (temperature 1, no top-k/top-p) at each generated
              token, i.e. what a verifier or scorer needs regardless of how the token was sampled; 0 after the stop.
    lengths:  int32 [B] number of generated tokens, the stop token included.
    """

    tokens: Int[Array, "B N"]
    logprobs: Float[Array, "B N"]
    lengths: Int[Array, "B"]


class Request(NamedTuple):
    """Validated generation inputs (see `validate_request`)."""

    cfg: lm.LMConfig
    prompts: list[np.ndarray]
    stop_tokens: tuple[int, ...]
    temperature: float
    top_k: int | None
    top_p: float | None


def validate_request(
    cfg: lm.LMConfig | Mapping[str, Any],
    prompts: Sequence[Any] | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: Sequence[int] | None,
    rng: jax.Array | None,
) -> Request:
    """Checks every argument of `generate` in numpy, before any jit; ValueError naming the argument and value."""
    cfg = lm.LMConfig.from_config(cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError(f"generate: temperature={temperature} samples, so it needs rng (e.g. jax.random.key(0))")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"generate: top_p must be None or in (0, 1], got {top_p!r}")
    stop = cfg.eos_ids if stop_tokens is None else tuple(int(t) for t in stop_tokens)
    check_token_ids(np.asarray(stop, np.int64), cfg.vocab_size, where="generate stop_tokens")

    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        prompts = list(np.asarray(prompts))
    if isinstance(prompts, (np.ndarray, jax.Array)) or not isinstance(prompts, Sequence) or not len(prompts):
        raise ValueError(
            "generate: prompts must be a non-empty list of 1-D token arrays or a 2-D [B, T] array, "
            f"got {type(prompts).__name__} of shape {np.shape(prompts)}"
        )
    checked = []
    for i, p in enumerate(prompts):
        where = f"generate prompt {i}"
        arr = np.asarray(p)
        if arr.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D token array, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{where} is empty; every prompt needs at least one token (e.g. BOS)")
        arr = check_token_ids(arr, cfg.vocab_size, where=where)
        if arr.size + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"{where}: prompt length {arr.size} + max_new_tokens {max_new_tokens} = "
                f"{arr.size + max_new_tokens} exceeds model.max_seq_len={cfg.max_seq_len}"
            )
        checked.append(arr.astype(np.int32))
    return Request(
        cfg, checked, stop, temperature, None if top_k is None else int(top_k), None if top_p is None else float(top_p)
    )


def bucket_length(n: int, max_len: int, *, minimum: int = MIN_BUCKET) -> int:
    """Padded length for n items: the next power of two >= n (at least `minimum`), capped at `max_len`."""
    return min(max(minimum, 1 << (int(n) - 1).bit_length()), max_len)


def _decode_step(params, cfg, tok_B, pos_B, cache):
    out = lm.forward(params, tok_B[:, None], cfg, positions_BT=pos_B[:, None], kv_cache=cache)
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


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "spec", "greedy", "use_top_k", "use_top_p"))
def _generate_jit(
    params,
    tokens_BT,
    prompt_lens_B,
    stop_ids_E,
    rng,
    temperature,
    top_k,
    top_p,
    *,
    cfg: lm.LMConfig,
    max_new_tokens: int,
    spec: CacheSpec,
    greedy: bool,
    use_top_k: bool,
    use_top_p: bool,
):
    B, T = tokens_BT.shape
    N = max_new_tokens

    def pick(logits_BV, step):
        if greedy:
            tok_B = sampling.greedy(logits_BV)
        else:
            tok_B = sampling.sample(
                logits_BV,
                sampling.step_key(rng, step),
                temperature=temperature,
                top_k=top_k if use_top_k else None,
                top_p=top_p if use_top_p else None,
            )
        return tok_B, sampling.token_logprobs(logits_BV, tok_B)

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
        params, tokens_BT, cfg, positions_BT=pos_BT, kv_cache=cache, logits_at=(prompt_lens_B - 1)[:, None]
    )
    last_BV = out.logits[:, 0]
    tok_B, lp_B = pick(last_BV, 0)
    tokens_BN = jnp.full((B, N), cfg.pad_id, jnp.int32).at[:, 0].set(tok_B)
    logprobs_BN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp_B)
    done_B = is_stop(tok_B)
    cache = _free_rows(out.kv_cache, done_B) if paged else out.kv_cache
    state = (jnp.int32(1), cache, tokens_BN, logprobs_BN, tok_B, done_B, jnp.ones((B,), jnp.int32), ok)

    def cond(state):
        i, _, _, _, _, done_B, _, ok = state
        return (i < N) & ~jnp.all(done_B) & ok

    def body(state):
        i, cache, tokens_BN, logprobs_BN, prev_B, done_B, lengths_B, ok = state
        pos_B = prompt_lens_B + i - 1
        if paged:  # a row crossing into a new page takes one from the pool; finished rows hold none
            cache, ok = _grab_pages(cache, (pos_B % spec.page_size == 0) & ~done_B, pos_B)
        # Finished rows keep computing (the batch moves in lockstep) but their outputs are discarded.
        logits_BV, cache = _decode_step(params, cfg, prev_B, pos_B, cache)
        tok_B, lp_B = pick(logits_BV, i)
        tokens_BN = tokens_BN.at[:, i].set(jnp.where(done_B, cfg.pad_id, tok_B))
        logprobs_BN = logprobs_BN.at[:, i].set(jnp.where(done_B, 0.0, lp_B))
        lengths_B = lengths_B + (~done_B).astype(jnp.int32)
        new_done_B = done_B | is_stop(tok_B)
        if paged:  # pages of rows that just stopped go back to the pool for the rows still running
            cache = _free_rows(cache, new_done_B & ~done_B)
        return i + 1, cache, tokens_BN, logprobs_BN, tok_B, new_done_B, lengths_B, ok

    _, _, tokens_BN, logprobs_BN, _, _, lengths_B, ok = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens_BN, logprobs_BN, lengths_B), ok


def generate(
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
    kv_layout: str = "dense",
    kv_dtype: str | None = None,
    page_size: int = 16,
    num_pages: int | None = None,
) -> GenerateOutput:
    """Continues each prompt by up to `max_new_tokens` tokens with one compiled prefill + decode loop.

    Args:
      params: LM parameters (`lm.init` layout).
      cfg: an `lm.LMConfig` or a ConfigDict/dict of its fields.
      prompts: a list of 1-D int token arrays (lengths may differ) or a 2-D [B, T] array of equal-length prompts.
      max_new_tokens: N; prompt length + N must fit in `cfg.max_seq_len`.
      temperature: 0 = greedy (argmax; top_k/top_p then ignored), > 0 samples and needs `rng`.
      top_k: keep the k most likely tokens before sampling.
      top_p: nucleus sampling; keep the smallest most-likely set with probability >= top_p.
      stop_tokens: ids that end a sequence (kept as its last token); None = `cfg.eos_ids`, () = never stop.
      rng: PRNG key; step i samples with `jax.random.fold_in(rng, i)` over the whole batch.
      kv_layout: "dense" ([B, S] slots per layer) or "paged" (a pool of `page_size`-token pages handed out from a
        free list as rows grow and returned when a row stops, so `num_pages` may be below the worst case B * S / C).
      kv_dtype: cache dtype; None = the model's compute dtype, "int8" = per-token, per-head quantised.
      page_size, num_pages: paging (paged only); num_pages defaults to the worst case. Running out raises.

    Returns:
      GenerateOutput(tokens [B, N] int32, logprobs [B, N] float32, lengths [B] int32); logprobs are under the
      unmodified model distribution (log_softmax of raw logits), whatever temperature/top-k/top-p sampled them.
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
    )
    cfg, lens = req.cfg, [p.size for p in req.prompts]
    T = bucket_length(max(lens), cfg.max_seq_len)
    # Decode writes positions up to max(lens) + N - 2; the prefill block needs T slots. A multiple of 16 lets the
    # decode kernel read a dense cache in 16-token (or larger) pages.
    cache_len = min(-(-(T + max_new_tokens) // 16) * 16, cfg.max_seq_len)
    spec = _cache_spec(cfg, len(lens), cache_len, kv_layout, kv_dtype, page_size, num_pages)
    tokens_BT = np.full((len(lens), T), cfg.pad_id, np.int32)
    for b, p in enumerate(req.prompts):
        tokens_BT[b, : p.size] = p
    # Stop ids padded with -1 (never a token) to a bucketed count, so stop sets of similar size share a compile.
    stop_E = np.full(bucket_length(len(req.stop_tokens) or 1, 1 << 30, minimum=4), -1, np.int32)
    stop_E[: len(req.stop_tokens)] = req.stop_tokens
    greedy = req.temperature == 0.0
    # Host values go to the jitted call as numpy: each eager jnp conversion was a dispatch of its own (~2 ms a call).
    out, ok = _generate_jit(
        params,
        tokens_BT,
        np.asarray(lens, np.int32),
        stop_E,
        _unused_key() if greedy else rng,
        np.float32(req.temperature or 1.0),
        np.int32(req.top_k or 1),
        np.float32(req.top_p or 1.0),
        cfg=cfg,
        max_new_tokens=int(max_new_tokens),
        spec=spec,
        greedy=greedy,
        use_top_k=req.top_k is not None and not greedy,
        use_top_p=req.top_p is not None and not greedy,
    )
    if not bool(ok):
        worst = len(lens) * spec.seq_len // spec.page_size
        raise RuntimeError(
            f"generate: the paged KV cache ran out of pages (num_pages={spec.num_pages}, page_size={spec.page_size}, "
            f"batch={len(lens)}); pass a larger num_pages (the worst case is {worst})"
        )
    return out


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
