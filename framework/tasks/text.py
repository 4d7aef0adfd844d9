"""Toy text tasks with exact answers, for the printable-text tokenizer ("text"): sources for `data.make_text_dataset`.

The string task copies or reverses a random string of printable characters (letters, digits, punctuation and
spaces). One example, prompt then completion, each line ending in "\\n":

    reverse: a7{ Qz!       <- prompt
    !zQ {7a                <- completion (the exact answer)

  source = text.string_source(ops=("copy", "reverse"), lengths=(3, 12))
  ds = data.make_text_dataset(source, "text", seed=0, batch_size=8, seq_len=source.max_tokens)

Example i of stream s draws from `np.random.default_rng([s, i])` alone, like the arithmetic task, so batches are
deterministic and resumable. `solve(prompt)` gives the exact completion of any prompt of this form.
"""

from __future__ import annotations

import functools
import string

import numpy as np

from framework.tasks.data import TextExample, TextSource

STRING_OPS = ("copy", "reverse")
# Characters a string is drawn from: printable ASCII without "\n"/"\t" (the line structure stays unambiguous).
STRING_CHARS = string.ascii_letters + string.digits + string.punctuation + " "


def _apply(op: str, s: str) -> str:
    return s if op == "copy" else s[::-1]


def solve(prompt: str) -> str:
    """The exact completion of a string-task prompt "op: s\\n": s or reversed s, then "\\n"."""
    op, sep, rest = prompt.partition(": ")
    if op not in STRING_OPS or not sep or not rest.endswith("\n") or "\n" in rest[:-1]:
        raise ValueError(f"prompt = {prompt!r}; expected 'op: s\\n' with op one of {STRING_OPS} and s on one line")
    return _apply(op, rest[:-1]) + "\n"


def _string_example_at(stream_seed: int, index: int, *, ops: tuple[str, ...], lengths: tuple[int, int]) -> TextExample:
    rng = np.random.default_rng([int(stream_seed), int(index)])
    op = ops[int(rng.integers(len(ops)))]
    n = int(rng.integers(lengths[0], lengths[1] + 1))
    s = "".join(STRING_CHARS[i] for i in rng.integers(len(STRING_CHARS), size=n).tolist())
    return TextExample(f"{op}: {s}\n", _apply(op, s) + "\n", {"length": n})


def string_source(ops: tuple[str, ...] = STRING_OPS, lengths: tuple[int, int] = (3, 12)) -> TextSource:
    """The copy/reverse string task as a source; `lengths` is the inclusive range of the string's length.

    Token bounds are for the "text" tokenizer (one token per character, BOS and EOS included). Every example
    carries its string length as the "length" field.
    """
    ops = tuple(ops)
    if not ops or any(op not in STRING_OPS for op in ops):
        raise ValueError(f"ops = {ops!r}; expected a non-empty subset of {STRING_OPS}")
    lo, hi = (int(x) for x in lengths)
    if not 1 <= lo <= hi:
        raise ValueError(f"lengths = {lengths!r}; expected (lo, hi) with 1 <= lo <= hi")

    def tokens(op_len: int, n: int) -> int:  # BOS + "op: " + s + "\n" + answer + "\n" + EOS
        return 1 + op_len + 2 + n + 1 + n + 1 + 1

    return TextSource(
        functools.partial(_string_example_at, ops=ops, lengths=(lo, hi)),
        name="string",
        min_tokens=tokens(min(len(op) for op in ops), lo),
        max_tokens=tokens(max(len(op) for op in ops), hi),
        fields=("length",),
        hint=f" (string_source(lengths=(lo, hi)).max_tokens = {tokens(max(len(op) for op in ops), hi)})",
    )
