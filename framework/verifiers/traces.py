"""Solution traces as verifier inputs: lines (steps and the answer line) and where each one ends in the token stream.

Glossary: B traces, T padded tokens, L padded lines per trace.

A trace is a completion text after the prompt (what a policy writes): step lines, then an "A xx" answer line, each
ending in "\\n". A verifier reads the hidden state at the newline that closes each line, so line j's score sits at
token position `ends[j]` of `[BOS] + prompt + completion`. Text after the last newline is an unfinished line and
gets no score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from framework.tasks import arithmetic, data
from framework.tasks import tokenizer as tok

NEWLINE_ID = int(tok.encode("\n")[0])


def split_lines(completion: str) -> list[str]:
    """The finished lines of a completion (without their "\\n"); an unfinished last line is left out."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    return completion.split("\n")[:-1]


def is_answer_line(line: str) -> bool:
    """True for the answer line ("A xx"): the checker ends the solution at the first line starting with "A"."""
    return line.startswith("A")


def is_finished(completion: str) -> bool:
    """True once a finished line of the completion is an answer line (nothing after it is read)."""
    return any(is_answer_line(line) for line in split_lines(completion))


def truncate_after_answer(completion: str) -> str:
    """The completion up to and including its first answer line (the rest is ignored by the checker anyway)."""
    out = []
    for line in split_lines(completion):
        out.append(line + "\n")
        if is_answer_line(line):
            return "".join(out)
    return completion


class EncodedTraces(NamedTuple):
    """A padded batch of traces for a verifier.

    tokens:    int32 [B, T] `[BOS] + prompt + completion`, PAD after.
    ends:      int32 [B, L] token position of the newline closing line j (0 where line j does not exist).
    line_mask: float32 [B, L] 1 where line j exists.
    lengths:   int32 [B] real tokens per row.
    """

    tokens: np.ndarray
    ends: np.ndarray
    line_mask: np.ndarray
    lengths: np.ndarray


def encode_traces(
    problems: Sequence[arithmetic.Problem],
    completions: Sequence[str],
    *,
    seq_len: int | None = None,
    max_lines: int | None = None,
) -> EncodedTraces:
    """Tokenizes (problem, completion) pairs and finds each line's closing newline; pads to seq_len / max_lines."""
    if len(problems) != len(completions):
        raise ValueError(f"encode_traces: {len(problems)} problems but {len(completions)} completions")
    if not len(problems):
        raise ValueError("encode_traces needs at least one trace")
    rows, ends = [], []
    for p, c in zip(problems, completions):
        prompt = data.encode_prompt(p)
        body = tok.encode(c)
        rows.append(np.concatenate([prompt, body]).astype(np.int32))
        ends.append(len(prompt) + np.flatnonzero(body == NEWLINE_ID))
    T = max(len(r) for r in rows)
    L = max(max((len(e) for e in ends), default=0), 1)
    if seq_len is not None:
        if T > seq_len:
            raise ValueError(f"encode_traces: a trace is {T} tokens but seq_len = {seq_len}")
        T = seq_len
    if max_lines is not None:
        if L > max_lines:
            raise ValueError(f"encode_traces: a trace has {L} lines but max_lines = {max_lines}")
        L = max_lines
    tokens = np.full((len(rows), T), tok.PAD_ID, np.int32)
    end_pos = np.zeros((len(rows), L), np.int32)
    mask = np.zeros((len(rows), L), np.float32)
    for b, (r, e) in enumerate(zip(rows, ends)):
        tokens[b, : len(r)] = r
        end_pos[b, : len(e)] = e
        mask[b, : len(e)] = 1.0
    return EncodedTraces(tokens, end_pos, mask, np.asarray([len(r) for r in rows], np.int32))


def pad_labels(labels: Sequence[np.ndarray], max_lines: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-trace label vectors (NaN = no label) -> (labels [B, L] float32, mask [B, L] float32)."""
    out = np.zeros((len(labels), max_lines), np.float32)
    mask = np.zeros((len(labels), max_lines), np.float32)
    for b, lab in enumerate(labels):
        lab = np.asarray(lab, np.float32)
        if lab.size > max_lines:
            raise ValueError(f"pad_labels: trace {b} has {lab.size} labels but max_lines = {max_lines}")
        ok = ~np.isnan(lab)
        out[b, : lab.size] = np.where(ok, lab, 0.0)
        mask[b, : lab.size] = ok
    return out, mask
