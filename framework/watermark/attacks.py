"""Attacks on watermarked text: token edits at rate ε, copy-paste mixing, and re-generation of spans by another
(unwatermarked) Lumen model.

Glossary: B batch, T time.

Every attack takes (tokens_BT, lengths_B, start_B) as `detect` does (the prompt before start_B is never touched)
and returns new (tokens_BT, lengths_B) with the same start; randomness comes from a numpy Generator seeded by the
caller, so an attack is reproducible. Edits run on the host: attacks model an adversary, not the decoder's hot path.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from framework.watermark import base


def _rows(tokens_BT, lengths_B, start_B):
    tokens = np.asarray(tokens_BT)
    lengths = np.asarray(lengths_B)
    start = np.zeros(len(tokens), np.int64) if start_B is None else np.asarray(start_B)
    return [tokens[b, : lengths[b]] for b in range(len(tokens))], start


def _pack(rows, pad_id: int, width: int | None = None):
    width = width or max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad_id, np.int32)
    lens = np.zeros(len(rows), np.int32)
    for b, r in enumerate(rows):
        r = np.asarray(r)[:width]
        out[b, : len(r)] = r
        lens[b] = len(r)
    return out, lens


def _check_rate(rate):
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"attacks: rate={rate!r}: expected a fraction in [0, 1]")


def substitute(tokens_BT, lengths_B, start_B, *, rate: float, vocab_size: int, seed: int = 0, pad_id: int = 0):
    """Replaces each text token (past start) with probability `rate` by a uniformly random token id."""
    _check_rate(rate)
    base.check_int("vocab_size", vocab_size, 1, where="attacks.substitute")
    rng = np.random.default_rng(seed)
    rows, start = _rows(tokens_BT, lengths_B, start_B)
    out = []
    for r, s in zip(rows, start):
        r = r.copy()
        hit = rng.random(len(r)) < rate
        hit[:s] = False
        r[hit] = rng.integers(0, vocab_size, int(hit.sum()))
        out.append(r)
    return _pack(out, pad_id, np.asarray(tokens_BT).shape[1])


def delete(tokens_BT, lengths_B, start_B, *, rate: float, seed: int = 0, pad_id: int = 0):
    """Deletes each text token (past start) with probability `rate`; rows get shorter."""
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    rows, start = _rows(tokens_BT, lengths_B, start_B)
    out = []
    for r, s in zip(rows, start):
        keep = rng.random(len(r)) >= rate
        keep[:s] = True
        out.append(r[keep])
    return _pack(out, pad_id, np.asarray(tokens_BT).shape[1])


def insert(tokens_BT, lengths_B, start_B, *, rate: float, vocab_size: int, seed: int = 0, pad_id: int = 0):
    """After each text token, inserts a random token with probability `rate`; rows grow (the array widens)."""
    _check_rate(rate)
    base.check_int("vocab_size", vocab_size, 1, where="attacks.insert")
    rng = np.random.default_rng(seed)
    rows, start = _rows(tokens_BT, lengths_B, start_B)
    out = []
    for r, s in zip(rows, start):
        new = list(r[:s])
        for t in r[s:]:
            new.append(int(t))
            if rng.random() < rate:
                new.append(int(rng.integers(0, vocab_size)))
        out.append(np.asarray(new, np.int32))
    return _pack(out, pad_id)


def copy_paste(tokens_BT, lengths_B, start_B, other_BT, *, rate: float, seed: int = 0, pad_id: int = 0):
    """Overwrites one contiguous span holding a fraction `rate` of each row's text with the same positions of
    `other_BT` (unwatermarked text of at least the same lengths), at a random offset: mixed-authorship text."""
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    rows, start = _rows(tokens_BT, lengths_B, start_B)
    other = np.asarray(other_BT)
    if other.shape[0] != len(rows) or other.shape[1] < max(len(r) for r in rows):
        raise ValueError(
            f"attacks.copy_paste: other_BT has shape {other.shape}; expected {len(rows)} rows at least "
            f"{max(len(r) for r in rows)} wide"
        )
    out = []
    for b, (r, s) in enumerate(zip(rows, start)):
        r = r.copy()
        n = len(r) - s
        span = int(round(rate * n))
        if span:
            at = s + int(rng.integers(0, n - span + 1))
            r[at : at + span] = other[b, at : at + span]
        out.append(r)
    return _pack(out, pad_id, np.asarray(tokens_BT).shape[1])


def regenerate(
    tokens_BT,
    lengths_B,
    start_B,
    *,
    params: Any,
    cfg: Any,
    rate: float,
    span: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    pad_id: int = 0,
):
    """Re-writes spans with a second, unwatermarked Lumen model: the text is cut into `span`-token blocks and each
    block is, with probability `rate`, replaced by the attacker model's own continuation of everything before it
    (one `generate` call over every row per block index)."""
    from framework.inference import generate  # the decoder is only needed by this attack

    _check_rate(rate)
    base.check_int("span", span, 1, where="attacks.regenerate")
    rng = np.random.default_rng(seed)
    rows, start = _rows(tokens_BT, lengths_B, start_B)
    rows = [list(map(int, r)) for r in rows]
    n_blocks = max((len(r) - s + span - 1) // span for r, s in zip(rows, start))
    for k in range(n_blocks):
        picked = [s + k * span < len(r) and rng.random() < rate for r, s in zip(rows, start)]
        if not any(picked):
            continue
        # Every row continues (a fixed batch, so one compile per prefix-length bucket); only picked rows keep it.
        prefixes = [np.asarray(r[: min(s + k * span, len(r))], np.int32) for r, s in zip(rows, start)]
        out = generate(
            params,
            cfg,
            prefixes,
            max_new_tokens=span,
            temperature=temperature,
            stop_tokens=(),
            rng=jax.random.key(seed * 1009 + k),
        )
        new = np.asarray(out.tokens)
        for b in np.flatnonzero(picked):
            at = start[b] + k * span
            end = min(at + span, len(rows[b]))
            rows[b][at:end] = new[b, : end - at].tolist()
    return _pack([np.asarray(r, np.int32) for r in rows], pad_id, np.asarray(tokens_BT).shape[1])
