"""Training and eval batches for the arithmetic task, as a step-indexed grain pipeline.

An example is `[BOS] + prompt + solution + [EOS]`, right-padded with PAD to `seq_len`:

    tokens      BOS Q _ 2 3 + 4 5 \\n  2 3 + 4 5 = 6 8 \\n ... A _ 8 7 \\n EOS PAD ...
    loss_mask    0  0 0 0 0 0 0 0  0   1 1 1 1 1 1 1 1  1  ... 1 1 1 1  1   1   0  ...   (loss_on="solution")

`loss_mask[t] = 1` iff token t is a target the model must predict (the trainer scores logits at t-1 against
token t): the solution and the EOS by default, every non-PAD token after BOS with `loss_on="all"`.

Batch dict: "tokens" int32 [B, T], "loss_mask" float32 [B, T], "prompt_lengths" int32 [B] (BOS + prompt),
"num_steps" int32 [B] (K of each problem).

Determinism and resume: element i of `make_dataset(...)` is batch i, made of problems
`problem_at(split_seed(seed, split), i * B + j)` for j < B. Nothing else is random, so resuming a run exactly needs
only the step number: `batch_iterator(dataset, start_step=step)` yields the batches step, step + 1, ... (grain's
iterator also has get_state/set_state, but the step-indexed design is the contract).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from framework.tasks import arithmetic
from framework.tasks.arithmetic import Knobs, Problem
from framework.tasks.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, check_token_ids, encode

SPLITS = ("train", "eval", "test")
LOSS_ON = ("solution", "all")
Batch = dict[str, np.ndarray]


def split_seed(seed: int, split: str) -> int:
    """The problem-stream seed of a split: different splits of one seed are different streams."""
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}; expected one of {SPLITS}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed = {seed!r}; expected a non-negative int")
    state = np.random.SeedSequence([int(seed), SPLITS.index(split)]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def max_seq_len(max_steps: int, modulus: int = arithmetic.DEFAULT_MODULUS, answer_mod: int | None = None) -> int:
    """Tokens in the longest example with up to `max_steps` steps (BOS and EOS included)."""
    return (
        1
        + arithmetic.prompt_length(max_steps, modulus, answer_mod)
        + arithmetic.solution_length(max_steps, modulus)
        + 1
    )


def encode_prompt(problem: Problem) -> np.ndarray:
    """`[BOS] + prompt` ids (int32): what generation starts from."""
    return np.concatenate([[BOS_ID], encode(arithmetic.format_prompt(problem))]).astype(np.int32)


def _too_long(length: int, seq_len: int, what: str) -> ValueError:
    return ValueError(
        f"{what} is {length} tokens but seq_len = {seq_len}; raise seq_len (data.max_seq_len(max_steps, modulus, "
        f"answer_mod) gives the longest example) or lower the num_steps knob"
    )


def _unpadded(problem: Problem, loss_on: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens, loss_mask, prompt length) of one example without padding."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on = {loss_on!r}; expected one of {LOSS_ON}")
    prompt = encode_prompt(problem)
    solution = encode(arithmetic.format_solution(problem))
    tokens = np.concatenate([prompt, solution, [EOS_ID]]).astype(np.int32)
    loss_mask = np.zeros(len(tokens), np.float32)
    loss_mask[len(prompt) if loss_on == "solution" else 1 :] = 1.0
    return tokens, loss_mask, len(prompt)


def encode_example(problem: Problem, seq_len: int, loss_on: str = "solution") -> Batch:
    """One padded example: tokens [T], loss_mask [T], prompt_lengths [], num_steps []."""
    example, mask, prompt_len = _unpadded(problem, loss_on)
    n = len(example)
    if n > seq_len:
        raise _too_long(n, seq_len, f"example with num_steps = {problem.num_steps}")
    tokens = np.full(seq_len, PAD_ID, np.int32)
    tokens[:n] = example
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[:n] = mask
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "prompt_lengths": np.int32(prompt_len),
        "num_steps": np.int32(problem.num_steps),
    }


def _stack(examples: Sequence[Batch]) -> Batch:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _checked(batch: Batch) -> Batch:
    check_token_ids(batch["tokens"], VOCAB_SIZE, where="data batch")
    return batch


def collate(problems: Sequence[Problem], seq_len: int, loss_on: str = "solution") -> Batch:
    """A batch dict from a list of problems (eval sets, probes), token ids checked."""
    if not problems:
        raise ValueError("collate needs at least one problem")
    return _checked(_stack([encode_example(p, seq_len, loss_on) for p in problems]))


def _example_at(index: int, *, stream_seed: int, seq_len: int, loss_on: str, knobs: Knobs) -> Batch:
    return encode_example(knobs.problem_at(stream_seed, int(index)), seq_len, loss_on)


def _packed_row_at(index: int, *, stream_seed: int, seq_len: int, loss_on: str, knobs: Knobs, per_row: int) -> Batch:
    """Row `index` of a packed stream: problems index*per_row, index*per_row + 1, ... laid end to end until the
    next one does not fit. Every row is a pure function of its index (unused problem indices are skipped)."""
    tokens = np.full(seq_len, PAD_ID, np.int32)
    loss_mask = np.zeros(seq_len, np.float32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    cursor = 0
    for j in range(per_row):
        example, mask, _ = _unpadded(knobs.problem_at(stream_seed, int(index) * per_row + j), loss_on)
        n = len(example)
        if cursor + n > seq_len:
            break
        tokens[cursor : cursor + n] = example
        loss_mask[cursor : cursor + n] = mask
        segment_ids[cursor : cursor + n] = j + 1
        positions[cursor : cursor + n] = np.arange(n)
        cursor += n
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


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
    """A grain MapDataset whose element i is batch i of the seeded problem stream of `split`.

    `knobs` are the task knobs (num_steps, ops, op_weights, modulus, answer_mod; see `arithmetic.Knobs`).
    `num_batches=None` makes the stream effectively endless. Too small a `seq_len` for the knobs is a ValueError
    here, before any batch is built.

    `pack=True` lays several examples end to end in each row (no padding between them) and adds "segment_ids"
    [B, T] (1, 2, ... per example, 0 on padding) and "positions" [B, T] (position within its example) for the
    model's segment mask; "prompt_lengths"/"num_steps" are then absent. Rows hold examples in stream order until
    the next one does not fit, so a row is still a pure function of its index.

    `rows=(lo, hi)` makes element i only rows lo..hi-1 of batch i, built without the others: how each process of a
    multi-host run loads its own shard of every global batch.
    """
    k = arithmetic.make_knobs(**knobs)
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on = {loss_on!r}; expected one of {LOSS_ON}")
    for name, v in [("batch_size", batch_size), ("seq_len", seq_len)]:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} = {v!r}; expected a positive int")
    need = max_seq_len(k.steps_range[1], k.modulus, k.answer_mod)
    if seq_len < need:
        raise _too_long(need, seq_len, f"the longest example for num_steps = {k.num_steps!r}")
    if num_batches is None:
        num_batches = sys.maxsize // batch_size
    elif isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 0:
        raise ValueError(f"num_batches = {num_batches!r}; expected None or a non-negative int")
    common = dict(stream_seed=split_seed(seed, split), seq_len=seq_len, loss_on=loss_on, knobs=k)
    if pack:
        shortest = max_seq_len(k.steps_range[0], k.modulus, k.answer_mod)
        example = functools.partial(_packed_row_at, per_row=seq_len // shortest, **common)
    else:
        example = functools.partial(_example_at, **common)
    if rows is not None:
        lo, hi = (int(r) for r in rows)
        if not 0 <= lo < hi <= batch_size:
            raise ValueError(f"rows = {rows!r}; expected (lo, hi) with 0 <= lo < hi <= batch_size = {batch_size}")
        part = functools.partial(_rows_of_batch, example=example, batch_size=batch_size, lo=lo, hi=hi)
        return grain.MapDataset.range(int(num_batches)).map(part).map(_checked)
    return (
        grain.MapDataset.range(int(num_batches) * batch_size)
        .map(example)
        .batch(batch_size, drop_remainder=True, batch_fn=_stack)
        .map(_checked)
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
