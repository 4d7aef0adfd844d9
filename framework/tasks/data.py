"""Training and eval batches from any (prompt, completion) text source and tokenizer, as a step-indexed grain pipeline.

Glossary: B batch, T tokens (seq_len).

An example is `[BOS] + encode(prompt) + encode(completion) + [EOS]`, right-padded to `seq_len`. For the arithmetic
task (prompt = the question line, completion = the gold solution):

    tokens      BOS Q _ 2 3 + 4 5 \\n  2 3 + 4 5 = 6 8 \\n ... A _ 8 7 \\n EOS PAD ...
    loss_mask    0  0 0 0 0 0 0 0  0   1 1 1 1 1 1 1 1  1  ... 1 1 1 1  1   1   0  ...   (loss_on="completion")

`loss_mask[t] = 1` iff token t is a target the model must predict (the trainer scores logits at t-1 against
token t): the completion and the EOS by default, every token after the first (BOS) with `loss_on="all"`; never
padding. The prompt and the completion are encoded separately, so the boundary is exact for any tokenizer.
Padding is the tokenizer's PAD, or its EOS when it has no pad (Llama; padding carries no loss and comes after the
example, so the causal model never reads it). A tokenizer without BOS (Qwen2) starts examples at the prompt; one
without EOS is an error.

Batch dict: "tokens" int32 [B, T], "loss_mask" float32 [B, T], "prompt_lengths" int32 [B] (BOS + prompt), and one
int32 [B] entry per field the source declares (the arithmetic source: "num_steps", K of each problem). Every
batch's ids are checked to lie in [0, tokenizer.vocab_size) (JAX gathers clamp bad ids silently).

Sources: a `TextSource` wraps `example_at(stream_seed, index) -> TextExample | (prompt, completion)`, a pure
function of its arguments. `arithmetic_source(**knobs)` is the arithmetic task; `framework.tasks.text` has toy
text tasks for the printable-text tokenizer. `make_dataset(**knobs)` is `make_text_dataset(arithmetic_source(...),
"arith", ...)` with the arithmetic task's error messages.

Too-long examples: with `too_long="error"` (the default) an example longer than `seq_len` raises ValueError naming
its index, length and seq_len, and a source's `max_tokens` (when it declares one) is checked against seq_len
before any batch is built. `too_long="truncate"` keeps the first seq_len tokens (the EOS and the end of the
completion are then lost; prompt_lengths is capped at seq_len).

Determinism and resume: element i of a dataset is batch i, made of examples `example_at(split_seed(seed, split),
i * B + j)` for j < B. Nothing else is random, so resuming a run exactly needs only the step number:
`batch_iterator(dataset, start_step=step)` yields the batches step, step + 1, ... (grain's iterator also has
get_state/set_state, but the step-indexed design is the contract).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from framework.tasks import arithmetic
from framework.tasks.arithmetic import Knobs, Problem
from framework.tasks.tokenizer import (
    TOKENIZER,
    VOCAB_SIZE,
    Tokenizer,
    check_token_ids,
    get_tokenizer,
)

SPLITS = ("train", "eval", "test")
LOSS_ON = ("solution", "all")  # the arithmetic task's names ("solution" = the completion)
TEXT_LOSS_ON = ("completion", "all")
TOO_LONG = ("error", "truncate")
Batch = dict[str, np.ndarray]


def split_seed(seed: int, split: str) -> int:
    """The example-stream seed of a split: different splits of one seed are different streams."""
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}; expected one of {SPLITS}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed = {seed!r}; expected a non-negative int")
    state = np.random.SeedSequence([int(seed), SPLITS.index(split)]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


# ---------------------------------------------------------------------------------------------------------------
# Sources and the general pipeline.


@dataclasses.dataclass(frozen=True)
class TextExample:
    """One (prompt, completion) pair, plus integer `fields` that become int32 [B] batch entries (e.g. num_steps)."""

    prompt: str
    completion: str
    fields: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TextSource:
    """A seeded stream of (prompt, completion) examples for `make_text_dataset`.

    example_at: `(stream_seed, index) -> TextExample | (prompt, completion)`, a pure function of its arguments.
    name: what error messages call the source.
    min_tokens: a lower bound on an example's tokens (BOS and EOS included): the stride of example indices per
      packed row, so any value >= 1 is correct; the true shortest length wastes no indices.
    max_tokens: the longest example's tokens (BOS and EOS included) under the tokenizer it is used with, or None
      (unknown: checked example by example).
    fields: names of the integer fields every example carries, in batch order.
    hint: appended to too-long errors, e.g. how to compute a long-enough seq_len.
    """

    example_at: Callable[[int, int], TextExample | tuple[str, str]]
    name: str = "text"
    min_tokens: int = 2
    max_tokens: int | None = None
    fields: tuple[str, ...] = ()
    hint: str = ""

    def __post_init__(self):
        if not callable(self.example_at):
            raise ValueError(f"TextSource.example_at = {self.example_at!r}; expected a callable (stream_seed, index)")
        m = self.min_tokens
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"TextSource.min_tokens = {self.min_tokens!r}; expected an int >= 1")
        object.__setattr__(self, "fields", tuple(self.fields))

    def example(self, stream_seed: int, index: int) -> TextExample:
        """Example `index` of the stream, checked: two strings and exactly the declared fields."""
        raw = self.example_at(stream_seed, index)
        ex = raw if isinstance(raw, TextExample) else TextExample(*raw)
        if not (isinstance(ex.prompt, str) and isinstance(ex.completion, str)):
            raise ValueError(
                f"source {self.name!r} example {index}: prompt and completion must be str, got "
                f"{type(ex.prompt).__name__} and {type(ex.completion).__name__}"
            )
        if tuple(ex.fields) != self.fields:
            if set(ex.fields) != set(self.fields):
                raise ValueError(
                    f"source {self.name!r} example {index} has fields {sorted(ex.fields)}; the source declares "
                    f"{list(self.fields)}"
                )
            ex = dataclasses.replace(ex, fields={k: ex.fields[k] for k in self.fields})
        return ex


def _as_source(source) -> TextSource:
    if isinstance(source, TextSource):
        return source
    if callable(source):
        return TextSource(source)
    raise ValueError(f"source = {source!r}; expected a TextSource or a callable (stream_seed, index) -> example")


def _framing(tokenizer: Tokenizer) -> tuple[list[int], int, int]:
    """(BOS prefix, EOS id, padding id) of a tokenizer; ValueError if it has no EOS to end examples with."""
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.name!r} has no EOS id: examples need one to end with")
    bos = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    pad = tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id
    return bos, int(tokenizer.eos_id), int(pad)


def _check_loss_on(loss_on: str, allowed: tuple[str, ...] = TEXT_LOSS_ON) -> None:
    if loss_on not in allowed:
        raise ValueError(f"loss_on = {loss_on!r}; expected one of {allowed}")


def encode_text_prompt(prompt: str, tokenizer: Tokenizer | str = "arith") -> np.ndarray:
    """`[BOS] + encode(prompt)` ids (int32): what generation starts from (no BOS for a tokenizer without one)."""
    return _prompt_ids(prompt, get_tokenizer(tokenizer))


def _prompt_ids(prompt: str, tok: Tokenizer) -> np.ndarray:
    bos, _, _ = _framing(tok)
    return np.concatenate([np.asarray(bos, np.int32), tok.encode(prompt)]).astype(np.int32)


def _unpadded(ex: TextExample, tok: Tokenizer, loss_on: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens, loss_mask, prompt length) of one example without padding."""
    _, eos, _ = _framing(tok)
    prompt = _prompt_ids(ex.prompt, tok)
    completion = tok.encode(ex.completion)
    tokens = np.concatenate([prompt, completion, [eos]]).astype(np.int32)
    loss_mask = np.zeros(len(tokens), np.float32)
    loss_mask[len(prompt) if loss_on == "completion" else 1 :] = 1.0
    return tokens, loss_mask, len(prompt)


def _too_long_text(n: int, seq_len: int, what: str, hint: str) -> ValueError:
    return ValueError(
        f"{what} is {n} tokens but seq_len = {seq_len}; raise seq_len{hint} or pass too_long='truncate' (keeps the "
        "first seq_len tokens)"
    )


def _fit(tokens, mask, seq_len: int, too_long: str, error: Callable[[int], ValueError]):
    """The example cut to seq_len under `too_long`, or the error for its length."""
    if len(tokens) > seq_len:
        if too_long == "error":
            raise error(len(tokens))
        tokens, mask = tokens[:seq_len], mask[:seq_len]
    return tokens, mask


def _padded(
    ex: TextExample,
    tok: Tokenizer,
    seq_len: int,
    loss_on: str,
    too_long: str,
    error: Callable[[int], ValueError],
) -> Batch:
    """One padded example: tokens [T], loss_mask [T], prompt_lengths [], then the example's fields []."""
    example, mask, prompt_len = _unpadded(ex, tok, loss_on)
    example, mask = _fit(example, mask, seq_len, too_long, error)
    n = len(example)
    tokens = np.full(seq_len, _framing(tok)[2], np.int32)
    tokens[:n] = example
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[:n] = mask
    out = {"tokens": tokens, "loss_mask": loss_mask, "prompt_lengths": np.int32(min(prompt_len, seq_len))}
    out.update({k: np.int32(v) for k, v in ex.fields.items()})
    return out


def encode_text_example(
    example: TextExample | tuple[str, str],
    tokenizer: Tokenizer | str,
    seq_len: int,
    loss_on: str = "completion",
    too_long: str = "error",
) -> Batch:
    """One padded example: tokens [T], loss_mask [T], prompt_lengths [] and the example's fields []."""
    ex = example if isinstance(example, TextExample) else TextExample(*example)
    _check_loss_on(loss_on)
    _check_too_long(too_long)
    error = functools.partial(_too_long_text, seq_len=seq_len, what="example", hint="")
    return _padded(ex, get_tokenizer(tokenizer), seq_len, loss_on, too_long, error)


def _stack(examples: Sequence[Batch]) -> Batch:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _checked(batch: Batch, vocab_size: int = VOCAB_SIZE) -> Batch:
    check_token_ids(batch["tokens"], vocab_size, where="data batch")
    return batch


def collate_text(
    examples: Sequence[TextExample | tuple[str, str]],
    tokenizer: Tokenizer | str,
    seq_len: int,
    loss_on: str = "completion",
    too_long: str = "error",
) -> Batch:
    """A batch dict from a list of (prompt, completion) examples (eval sets, probes), token ids checked."""
    if not examples:
        raise ValueError("collate_text needs at least one example")
    tok = get_tokenizer(tokenizer)
    rows = [encode_text_example(e, tok, seq_len, loss_on, too_long) for e in examples]
    return _checked(_stack(rows), tok.vocab_size)


def _check_too_long(too_long: str) -> None:
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long = {too_long!r}; expected one of {TOO_LONG}")


def _example_error(n: int, *, index: int, source: TextSource, seq_len: int) -> ValueError:
    return _too_long_text(n, seq_len, f"example {index} of source {source.name!r}", source.hint)


def _example_at(index: int, *, source: TextSource, tok: Tokenizer, stream_seed: int, **kw) -> Batch:
    index = int(index)
    error = functools.partial(_example_error, index=index, source=source, seq_len=kw["seq_len"])
    return _padded(source.example(stream_seed, index), tok, error=error, **kw)


def _packed_row_at(
    index: int,
    *,
    source: TextSource,
    tok: Tokenizer,
    stream_seed: int,
    seq_len: int,
    loss_on: str,
    too_long: str,
    per_row: int,
) -> Batch:
    """Row `index` of a packed stream: examples index*per_row, index*per_row + 1, ... laid end to end until the
    next one does not fit. Every row is a pure function of its index (unused example indices are skipped)."""
    tokens = np.full(seq_len, _framing(tok)[2], np.int32)
    loss_mask = np.zeros(seq_len, np.float32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    cursor = 0
    for j in range(per_row):
        i = int(index) * per_row + j
        example, mask, _ = _unpadded(source.example(stream_seed, i), tok, loss_on)
        error = functools.partial(_example_error, index=i, source=source, seq_len=seq_len)
        example, mask = _fit(example, mask, seq_len, too_long, error)
        n = len(example)
        if cursor + n > seq_len:
            break
        tokens[cursor : cursor + n] = example
        loss_mask[cursor : cursor + n] = mask
        segment_ids[cursor : cursor + n] = j + 1
        positions[cursor : cursor + n] = np.arange(n)
        cursor += n
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} = {v!r}; expected a positive int")


def make_text_dataset(
    source: TextSource | Callable[[int, int], TextExample | tuple[str, str]],
    tokenizer: Tokenizer | str,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    loss_on: str = "completion",
    split: str = "train",
    num_batches: int | None = None,
    pack: bool = False,
    rows: tuple[int, int] | None = None,
    too_long: str = "error",
) -> grain.MapDataset:
    """A grain MapDataset whose element i is batch i of `source`'s seeded stream for `split`, encoded by `tokenizer`.

    `tokenizer` is a `Tokenizer` or a `get_tokenizer` name/path ("arith", "text", a tokenizer.json). `loss_on`:
    "completion" (completion + EOS) or "all". `num_batches=None` makes the stream effectively endless.

    `pack=True` lays several examples end to end in each row (no padding between them) and adds "segment_ids"
    [B, T] (1, 2, ... per example, 0 on padding) and "positions" [B, T] (position within its example) for the
    model's segment mask; "prompt_lengths" and the source's fields are then absent. Rows hold examples in stream
    order until the next one does not fit, so a row is still a pure function of its index.

    `rows=(lo, hi)` makes element i only rows lo..hi-1 of batch i, built without the others: how each process of a
    multi-host run loads its own shard of every global batch.
    """
    src, tok = _as_source(source), get_tokenizer(tokenizer)
    _check_loss_on(loss_on)
    _check_too_long(too_long)
    _framing(tok)
    _positive("batch_size", batch_size)
    _positive("seq_len", seq_len)
    if too_long == "error" and src.max_tokens is not None and seq_len < src.max_tokens:
        raise _too_long_text(src.max_tokens, seq_len, f"the longest example of source {src.name!r}", src.hint)
    if num_batches is None:
        num_batches = sys.maxsize // batch_size
    elif isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 0:
        raise ValueError(f"num_batches = {num_batches!r}; expected None or a non-negative int")
    common = dict(
        source=src, tok=tok, stream_seed=split_seed(seed, split), seq_len=seq_len, loss_on=loss_on, too_long=too_long
    )
    if pack:
        example = functools.partial(_packed_row_at, per_row=max(1, seq_len // src.min_tokens), **common)
    else:
        example = functools.partial(_example_at, **common)
    checked = functools.partial(_checked, vocab_size=tok.vocab_size)
    if rows is not None:
        lo, hi = (int(r) for r in rows)
        if not 0 <= lo < hi <= batch_size:
            raise ValueError(f"rows = {rows!r}; expected (lo, hi) with 0 <= lo < hi <= batch_size = {batch_size}")
        part = functools.partial(_rows_of_batch, example=example, batch_size=batch_size, lo=lo, hi=hi)
        return grain.MapDataset.range(int(num_batches)).map(part).map(checked)
    return (
        grain.MapDataset.range(int(num_batches) * batch_size)
        .map(example)
        .batch(batch_size, drop_remainder=True, batch_fn=_stack)
        .map(checked)
    )


def _rows_of_batch(index: int, *, example, batch_size: int, lo: int, hi: int) -> Batch:
    return _stack([example(int(index) * batch_size + j) for j in range(lo, hi)])


def batch_iterator(
    dataset: grain.MapDataset, start_step: int = 0, *, prefetch: int = 2, num_threads: int = 1
) -> Iterator[Batch]:
    """Iterate batches start_step, start_step + 1, ...: resuming exactly needs only the step number.

    `prefetch` batches are built ahead on `num_threads` threads (prefetch=0: built on demand, no threads); the
    order never depends on either.
    """
    if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"start_step = {start_step!r}; expected a non-negative int")
    if prefetch < 0 or num_threads < 0:
        raise ValueError(f"prefetch = {prefetch}, num_threads = {num_threads}; expected non-negative ints")
    ds = dataset[int(start_step) :] if start_step else dataset
    threads = num_threads if prefetch > 0 else 0
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic task as a source.


def max_seq_len(max_steps: int, modulus: int = arithmetic.DEFAULT_MODULUS, answer_mod: int | None = None) -> int:
    """Tokens in the longest example with up to `max_steps` steps (BOS and EOS included)."""
    return (
        1
        + arithmetic.prompt_length(max_steps, modulus, answer_mod)
        + arithmetic.solution_length(max_steps, modulus)
        + 1
    )


_ARITH_HINT = (
    " (data.max_seq_len(max_steps, modulus, answer_mod) gives the longest example) or lower the num_steps knob"
)


def _too_long(length: int, seq_len: int, what: str) -> ValueError:
    return ValueError(f"{what} is {length} tokens but seq_len = {seq_len}; raise seq_len{_ARITH_HINT}")


def arithmetic_example(problem: Problem) -> TextExample:
    """The (question line, gold solution) pair of a problem, with its num_steps field."""
    return TextExample(
        arithmetic.format_prompt(problem), arithmetic.format_solution(problem), {"num_steps": problem.num_steps}
    )


def _arith_example_at(stream_seed: int, index: int, *, knobs: Knobs) -> TextExample:
    return arithmetic_example(knobs.problem_at(stream_seed, index))


def arithmetic_source(**knobs) -> TextSource:
    """The arithmetic task (knobs: num_steps, ops, op_weights, modulus, answer_mod) as a source for the "arith"
    tokenizer: example i of stream s is `arithmetic.problem_at(s, i, **knobs)`."""
    k = arithmetic.make_knobs(**knobs)
    return TextSource(
        functools.partial(_arith_example_at, knobs=k),
        name="arithmetic",
        min_tokens=max_seq_len(k.steps_range[0], k.modulus, k.answer_mod),
        max_tokens=max_seq_len(k.steps_range[1], k.modulus, k.answer_mod),
        fields=("num_steps",),
        hint=_ARITH_HINT,
    )


def encode_prompt(problem: Problem) -> np.ndarray:
    """`[BOS] + prompt` ids (int32) of an arithmetic problem: what generation starts from."""
    return _prompt_ids(arithmetic.format_prompt(problem), TOKENIZER)


def encode_example(problem: Problem, seq_len: int, loss_on: str = "solution") -> Batch:
    """One padded arithmetic example: tokens [T], loss_mask [T], prompt_lengths [], num_steps []."""
    _check_loss_on(loss_on, LOSS_ON)
    error = functools.partial(_too_long, seq_len=seq_len, what=f"example with num_steps = {problem.num_steps}")
    return _padded(arithmetic_example(problem), TOKENIZER, seq_len, _text_loss_on(loss_on), "error", error)


def _text_loss_on(loss_on: str) -> str:
    return "completion" if loss_on == "solution" else loss_on


def collate(problems: Sequence[Problem], seq_len: int, loss_on: str = "solution") -> Batch:
    """A batch dict from a list of arithmetic problems (eval sets, probes), token ids checked."""
    if not problems:
        raise ValueError("collate needs at least one problem")
    return _checked(_stack([encode_example(p, seq_len, loss_on) for p in problems]))


def make_dataset(
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    loss_on: str = "solution",
    split: str = "train",
    num_batches: int | None = None,
    pack: bool = False,
    rows: tuple[int, int] | None = None,
    **knobs,
) -> grain.MapDataset:
    """A grain MapDataset whose element i is batch i of the seeded arithmetic problem stream of `split`.

    `knobs` are the task knobs (num_steps, ops, op_weights, modulus, answer_mod; see `arithmetic.Knobs`);
    `loss_on` is "solution" (solution + EOS) or "all". Too small a `seq_len` for the knobs is a ValueError here,
    before any batch is built. The batches are `make_text_dataset(arithmetic_source(**knobs), "arith", ...)`'s:
    see it for `num_batches`, `pack` and `rows`; every batch also holds "num_steps" [B] (unless packed).
    """
    source = arithmetic_source(**knobs)
    _check_loss_on(loss_on, LOSS_ON)
    _positive("batch_size", batch_size)
    _positive("seq_len", seq_len)
    k = arithmetic.make_knobs(**knobs)
    if seq_len < source.max_tokens:
        raise _too_long(source.max_tokens, seq_len, f"the longest example for num_steps = {k.num_steps!r}")
    return make_text_dataset(
        source,
        TOKENIZER,
        seed=seed,
        batch_size=batch_size,
        seq_len=seq_len,
        loss_on=_text_loss_on(loss_on),
        split=split,
        num_batches=num_batches,
        pack=pack,
        rows=rows,
    )
