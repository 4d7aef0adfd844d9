"""Validated inputs of `generate` and `reference_generate`: every argument checked in numpy, before any jit.

Glossary: B batch, T_i prompt i's length, D model width, S token-buffer slots (T + N), N max_new_tokens.

`validate_request` turns the user's arguments into a `Request`: token prompts as int32 arrays (or `filler_id`
placeholders when only `prompt_embeds` are given), prompt embeddings as [T_i, D] arrays, the prefix lengths, and the
hooks in their static form (a tuple of processors, the sampler, interventions as name-sorted (name, fn) pairs).
Errors are ValueErrors naming the argument, the value and what was expected.

Padding never needs a pad token: the prompt block, the hooks' token buffer and the placeholders are filled with
`filler_id(cfg)` (the model's pad id, or 0 for a model without one, such as Llama) at positions that causal
attention and `lengths` keep out of every result. The generated tokens after a stop hold `pad_value` (the caller's
choice; default `default_pad_value(cfg)`: the pad id, or -1, which is no token, for a model without one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from framework.inference import sampling
from framework.models import lm
from framework.tasks.tokenizer import check_token_ids

MIN_BUCKET = 16
Interventions = tuple[tuple[str, Callable], ...]


def filler_id(cfg: lm.LMConfig) -> int:
    """The id right-padded prompt blocks and token buffers hold past each row's end (never read as content)."""
    return 0 if cfg.pad_id is None else int(cfg.pad_id)


def default_pad_value(cfg: lm.LMConfig) -> int:
    """What `generate` writes after a row's stop by default: the model's pad id, or -1 (no token) without one."""
    return -1 if cfg.pad_id is None else int(cfg.pad_id)


class Request(NamedTuple):
    """Validated generation inputs (see `validate_request`)."""

    cfg: lm.LMConfig
    prompts: list[np.ndarray]
    stop_tokens: tuple[int, ...]
    temperature: float
    top_k: int | None
    top_p: float | None
    processors: tuple[sampling.LogitsProcessor, ...]
    sampler: sampling.Sampler | None
    interventions: Interventions
    prompt_embeds: list[np.ndarray] | None  # [T_i, D] per prompt, replacing the prompt's lookup in the prefill
    prefix_len: np.ndarray | None  # int32 [B]: the prefix-LM mask of the prefill
    pad_value: int  # written after a row's stop in the returned tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_keys(self) -> bool:
        """Whether the draw reads per-row keys (sampling, or any sampler)."""
        return not self.greedy or self.sampler is not None


def _hashable(fn: Any) -> bool:
    try:
        hash(fn)
    except TypeError:
        return False
    return True


def _check_hooks(cfg: lm.LMConfig, processors: Any, sampler: Any, interventions: Any):
    """(processors tuple, sampler, interventions as name-sorted pairs), or ValueError naming the bad one."""
    if callable(processors) or isinstance(processors, (str, bytes)) or not isinstance(processors, Sequence):
        raise ValueError(
            f"generate: logits_processors must be a tuple of callables fn(logits_BV, tokens_BS, lengths_B), "
            f"got {type(processors).__name__}"
        )
    processors = tuple(processors)
    for i, fn in enumerate(processors):
        if not callable(fn) or not _hashable(fn):
            raise ValueError(
                f"generate: logits_processors[{i}]={fn!r} must be a hashable callable (a module function, a frozen "
                "dataclass, a functools.partial): processors are static under jit"
            )
    if sampler is not None and (not callable(sampler) or not _hashable(sampler)):
        raise ValueError(f"generate: sampler={sampler!r} must be None or a hashable callable (static under jit)")
    if interventions is None:
        interventions = ()
    elif isinstance(interventions, Mapping):
        interventions = tuple(interventions.items())
    elif isinstance(interventions, Sequence) and not isinstance(interventions, (str, bytes)):
        interventions = tuple(interventions)
    else:
        raise ValueError(
            f"generate: interventions must be a mapping of hookpoint name -> fn, got {type(interventions).__name__}"
        )
    names = lm.hookpoints(cfg)
    for item in interventions:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"generate: interventions entry {item!r} is not a (hookpoint name, fn) pair")
        name, fn = item
        if name not in names:
            raise ValueError(
                f"generate: interventions hookpoint {name!r} is unknown; expected one of {names[0]!r}, ..., "
                f"{names[-1]!r} (lm.hookpoints(cfg))"
            )
        if not callable(fn) or not _hashable(fn):
            raise ValueError(f"generate: interventions[{name!r}]={fn!r} must be a hashable callable (static under jit)")
    if len({n for n, _ in interventions}) != len(interventions):
        raise ValueError(f"generate: interventions name a hookpoint twice: {[n for n, _ in interventions]}")
    return processors, sampler, tuple(sorted(interventions, key=lambda item: item[0]))


def _check_rng(rng: Any, batch: int, needed: str | None) -> None:
    """ValueError unless rng is None (only when nothing needs it), one PRNG key, or `batch` keys."""
    if rng is None:
        if needed:
            raise ValueError(f"generate: {needed}, so it needs rng (e.g. jax.random.key(0), or one key per row)")
        return
    dtype, shape = getattr(rng, "dtype", None), np.shape(rng)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        single, rows = shape == (), shape[:1]
        ok = single or shape == (batch,)
    elif dtype == np.uint32 and len(shape) in (1, 2):  # raw key data: [k] one key, [B, k] a batch
        single, rows = len(shape) == 1, shape[:1]
        ok = single or rows == (batch,)
    else:
        ok, rows = False, None
    if not ok:
        raise ValueError(
            f"generate: rng must be one PRNG key or a batch of {batch} keys (one per prompt), got "
            f"{type(rng).__name__} of dtype {dtype} and shape {shape}" + (f" ({rows[0]} keys)" if rows else "")
        )


def _check_embeds(cfg: lm.LMConfig, prompt_embeds: Any) -> list[np.ndarray]:
    """[T_i, D] float arrays from a [B, T, D] array or a list of [T_i, D] arrays."""
    if isinstance(prompt_embeds, (np.ndarray, jax.Array)) and np.ndim(prompt_embeds) == 3:
        prompt_embeds = list(np.asarray(prompt_embeds))
    if isinstance(prompt_embeds, (np.ndarray, jax.Array)) or not isinstance(prompt_embeds, Sequence):
        raise ValueError(
            "generate: prompt_embeds must be a [B, T, D] array or a list of [T_i, D] arrays, "
            f"got {type(prompt_embeds).__name__} of shape {np.shape(prompt_embeds)}"
        )
    out = []
    for i, e in enumerate(prompt_embeds):
        e = np.asarray(e)
        if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] != cfg.d_model:
            raise ValueError(
                f"generate prompt_embeds {i}: expected [T_i >= 1, D={cfg.d_model}] (model.d_model), got shape {e.shape}"
            )
        if not np.issubdtype(e.dtype, np.floating):
            raise ValueError(f"generate prompt_embeds {i}: expected floating point, got {e.dtype}")
        out.append(e)
    return out


def _check_prefix(prefix_len: Any, lens: list[int]) -> np.ndarray:
    arr = np.asarray(prefix_len)
    if arr.shape != (len(lens),) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"generate: prefix_len must be {len(lens)} ints (one per prompt), got {arr.dtype} of shape {arr.shape}"
        )
    bad = [i for i, (p, n) in enumerate(zip(arr, lens)) if not 0 <= p <= n]
    if bad:
        i = bad[0]
        raise ValueError(
            f"generate: prefix_len[{i}]={int(arr[i])} must be in [0, prompt length {lens[i]}]: the prefix lies "
            "inside the prompt, which the prefill holds whole"
        )
    return arr.astype(np.int32)


def validate_request(
    cfg: lm.LMConfig | Mapping[str, Any],
    prompts: Sequence[Any] | np.ndarray | None,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: Sequence[int] | None,
    rng: jax.Array | None,
    logits_processors: Sequence[sampling.LogitsProcessor] = (),
    sampler: sampling.Sampler | None = None,
    interventions: Mapping[str, Callable] | Interventions | None = None,
    prompt_embeds: Any = None,
    prefix_len: Any = None,
    pad_value: int | None = None,
) -> Request:
    """Checks every argument of `generate` in numpy, before any jit; ValueError naming the argument and value."""
    cfg = lm.LMConfig.from_config(cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"generate: top_p must be None or in (0, 1], got {top_p!r}")
    stop = cfg.eos_ids if stop_tokens is None else tuple(int(t) for t in stop_tokens)
    check_token_ids(np.asarray(stop, np.int64), cfg.vocab_size, where="generate stop_tokens")
    processors, sampler, interventions = _check_hooks(cfg, logits_processors, sampler, interventions)
    embeds = None if prompt_embeds is None else _check_embeds(cfg, prompt_embeds)

    if pad_value is None:
        pad_value = default_pad_value(cfg)
    elif isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)):
        raise ValueError(f"generate: pad_value must be None or an int (written after a stop), got {pad_value!r}")
    if prompts is None and embeds is not None:  # placeholders: the buffer processors read holds the filler there
        prompts = [np.full(e.shape[0], filler_id(cfg), np.int32) for e in embeds]
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        prompts = list(np.asarray(prompts))
    if isinstance(prompts, (np.ndarray, jax.Array)) or not isinstance(prompts, Sequence) or not len(prompts):
        raise ValueError(
            "generate: prompts must be a non-empty list of 1-D token arrays or a 2-D [B, T] array, "
            f"got {type(prompts).__name__} of shape {np.shape(prompts)}"
        )
    needed = f"temperature={temperature} samples" if temperature > 0 else None
    needed = needed or ("a sampler draws with per-row keys" if sampler is not None else None)
    _check_rng(rng, len(prompts), needed)
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
    if embeds is not None:
        if len(embeds) != len(checked):
            raise ValueError(f"generate: {len(checked)} prompts but {len(embeds)} prompt_embeds")
        for i, (p, e) in enumerate(zip(checked, embeds)):
            if e.shape[0] != p.size:
                raise ValueError(
                    f"generate prompt_embeds {i}: {e.shape[0]} positions but prompt {i} has {p.size} tokens (pass "
                    "prompts=None to use placeholders)"
                )
    prefix = None if prefix_len is None else _check_prefix(prefix_len, [p.size for p in checked])
    return Request(
        cfg,
        checked,
        stop,
        temperature,
        None if top_k is None else int(top_k),
        None if top_p is None else float(top_p),
        processors,
        sampler,
        interventions,
        embeds,
        prefix,
        int(pad_value),
    )


def bucket_length(n: int, max_len: int, *, minimum: int = MIN_BUCKET) -> int:
    """Padded length for n items: the next power of two >= n (at least `minimum`), capped at `max_len`."""
    return min(max(minimum, 1 << (int(n) - 1).bit_length()), max_len)


def token_buffer(req: Request, max_new_tokens: int) -> np.ndarray:
    """The [B, T + N] buffer processors read: each prompt, then `filler_id` (T = the bucketed prompt block length)."""
    tokens_BT, _ = prompt_block(req)
    return np.pad(tokens_BT, ((0, 0), (0, max_new_tokens)), constant_values=filler_id(req.cfg))


def prompt_block(req: Request) -> tuple[np.ndarray, np.ndarray | None]:
    """The prefill's right-padded inputs: tokens [B, T] (`filler_id` past each prompt) and, with `prompt_embeds`,
    embeddings [B, T, D] (zeros past each prompt); T = the bucketed longest prompt."""
    lens = [p.size for p in req.prompts]
    T = bucket_length(max(lens), req.cfg.max_seq_len)
    tokens_BT = np.full((len(lens), T), filler_id(req.cfg), np.int32)
    for b, p in enumerate(req.prompts):
        tokens_BT[b, : p.size] = p
    if req.prompt_embeds is None:
        return tokens_BT, None
    dtype = np.result_type(*[e.dtype for e in req.prompt_embeds])
    embeds_BTD = np.zeros((len(lens), T, req.cfg.d_model), dtype)
    for b, e in enumerate(req.prompt_embeds):
        embeds_BTD[b, : e.shape[0]] = e
    return tokens_BT, embeds_BTD
