"""Preference data: (prompt, chosen, rejected) pairs on the arithmetic task, from a policy, or from any text source.

Glossary: N pairs (or unpaired rows), T tokens.

On the arithmetic task every label is known exactly. `arithmetic_pairs` makes chosen = the checker-correct gold
trace and rejected = the same trace with one step's result corrupted (the chain then continues correctly from the
wrong value, so the error propagates to the answer, as a real slip does; the step and offset are redrawn while the
answer stays right, up to 16 times, so nearly every rejected answer is wrong). Knobs: `flip_rate` swaps chosen and
rejected in that fraction of pairs (label noise, recorded per pair), `length_skew` appends filler after the answer
line (which the checker ignores) to the chosen (> 0) or the rejected (< 0) completion: a length bias that carries no
correctness signal. `sampled_pairs` draws completions from a policy and pairs a checker-correct one (or the gold
trace) with a wrong one: pairs that differ where that policy errs. `perturb_pairs` applies the same label flips and
length skew to any pairs. `kto_rows` unpairs pairs for KTO.

`encode_pairs` turns any pairs (Pair or (prompt, chosen, rejected) tuples, any tokenizer) into fixed-shape arrays:
`chosen_tokens`/`rejected_tokens` int32 [N, T] (BOS + prompt + completion + EOS) and `chosen_mask`/`rejected_mask`
float32 [N, T] over the completion and its EOS. Rows with an empty completion or chosen == rejected are dropped and
counted in the returned stats, never trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from framework.tasks import arithmetic, data, policy_eval
from framework.tasks.tokenizer import Tokenizer, get_tokenizer

_TRIES = 16
FILLER = "?"  # appended after the answer line by length_skew: in the arithmetic alphabet, ignored by the checker


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference pair; `flipped` marks injected label noise (chosen is then the worse completion)."""

    prompt: str
    chosen: str
    rejected: str
    flipped: bool = False


def corrupt_trace(problem: arithmetic.Problem, step: int, offset: int) -> str:
    """The gold trace with step `step`'s result shifted by `offset` (mod M), later steps computed from it."""
    k, m, w = problem.num_steps, problem.modulus, problem.width
    if not 0 <= step < k:
        raise ValueError(f"step = {step}; expected 0 <= step < num_steps = {k}")
    if offset % m == 0:
        raise ValueError(f"offset = {offset}; expected an offset that changes the value (not a multiple of {m})")
    value, lines = problem.start, []
    for i, (op, b) in enumerate(zip(problem.ops, problem.operands)):
        result = arithmetic.apply_op(value, op, b, m)
        if i == step:
            result = (result + offset) % m
        lines.append(f"{value:0{w}d}{op}{b:0{w}d}={result:0{w}d}\n")
        value = result
    answer = value if problem.answer_mod is None else value % problem.answer_mod
    return "".join(lines) + f"A {answer:0{w}d}\n"


def arithmetic_pairs(
    seed: int,
    n: int,
    *,
    split: str = "train",
    flip_rate: float = 0.0,
    length_skew: int = 0,
    **knobs,
) -> tuple[list[Pair], dict[str, Any]]:
    """`n` pairs (gold trace vs one corrupted step) on problems of `split`, and stats (flips, lengths).

    `knobs` are the arithmetic task's (num_steps, ops, op_weights, modulus, answer_mod). A pure function of its
    arguments.
    """
    if not 0.0 <= flip_rate <= 1.0:
        raise ValueError(f"flip_rate = {flip_rate!r}; expected a fraction in [0, 1]")
    if isinstance(length_skew, bool) or not isinstance(length_skew, (int, np.integer)):
        raise ValueError(f"length_skew = {length_skew!r}; expected an int (filler characters, sign = which side)")
    rng = np.random.default_rng([data.split_seed(seed, split), 0x9A1B])
    problems = arithmetic.sample_problems(rng, n, **knobs)
    pairs = []
    for p in problems:
        chosen = arithmetic.format_solution(p)
        for _ in range(_TRIES):  # prefer a slip that reaches a wrong answer (a later "*00" can absorb it)
            rejected = corrupt_trace(p, int(rng.integers(p.num_steps)), int(rng.integers(1, p.modulus)))
            if rejected.splitlines()[-1] != chosen.splitlines()[-1]:
                break
        if length_skew > 0:
            chosen += FILLER * length_skew
        elif length_skew < 0:
            rejected += FILLER * -length_skew
        flipped = bool(rng.uniform() < flip_rate)
        if flipped:
            chosen, rejected = rejected, chosen
        pairs.append(Pair(arithmetic.format_prompt(p), chosen, rejected, flipped))
    return pairs, pair_stats(pairs)


def pair_stats(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Counts and mean lengths: pairs, flipped, flip_rate, chosen_chars, rejected_chars."""
    n = len(pairs)
    flipped = sum(bool(getattr(p, "flipped", False)) for p in pairs)
    return dict(
        pairs=n,
        flipped=flipped,
        flip_rate=flipped / max(n, 1),
        chosen_chars=float(np.mean([len(p.chosen) for p in pairs])) if n else 0.0,
        rejected_chars=float(np.mean([len(p.rejected) for p in pairs])) if n else 0.0,
    )


def sampled_pairs(
    params,
    cfg,
    problems: Sequence[arithmetic.Problem],
    *,
    samples: int = 4,
    temperature: float = 1.0,
    rng,
    batch_size: int = 128,
    chosen: str = "sample",
) -> tuple[list[Pair], dict[str, Any]]:
    """Pairs of the policy's own completions judged by the checker: its first wrong sample of a problem as rejected,
    and as chosen its first exactly-correct sample (`chosen="sample"`; problems whose samples are all right or all
    wrong give no pair) or the gold trace (`chosen="gold"`; every problem with a wrong sample gives a pair)."""
    import jax

    if samples < 1 or (chosen == "sample" and samples < 2):
        raise ValueError(f"samples = {samples}; expected >= 2 completions per problem (>= 1 with chosen='gold')")
    if chosen not in ("sample", "gold"):
        raise ValueError(f"chosen = {chosen!r}; expected 'sample' (a correct sample) or 'gold' (the gold trace)")
    texts = [
        policy_eval.complete(
            params, cfg, list(problems), temperature=temperature, rng=jax.random.fold_in(rng, s), batch_size=batch_size
        )
        for s in range(samples)
    ]
    pairs, all_right, all_wrong = [], 0, 0
    for i, p in enumerate(problems):
        good, bad = [], []
        for s in range(samples):
            r = arithmetic.check_solution(p, texts[s][i])
            (good if r.answer_correct and r.process_correct else bad).append(texts[s][i])
        all_right += not bad
        all_wrong += not good
        if chosen == "gold":
            good = [arithmetic.format_solution(p)]
        if good and bad:
            pairs.append(Pair(arithmetic.format_prompt(p), good[0], bad[0]))
    return pairs, dict(pair_stats(pairs), problems=len(problems), all_right=all_right, all_wrong=all_wrong)


def perturb_pairs(
    pairs: Sequence[Pair], seed: int, *, flip_rate: float = 0.0, length_skew: int = 0
) -> tuple[list[Pair], dict[str, Any]]:
    """`pairs` with `length_skew` filler characters after the chosen (> 0) or rejected (< 0) completion and then a
    `flip_rate` fraction of labels swapped (drawn from `seed`, marked `flipped`), and their stats."""
    if not 0.0 <= flip_rate <= 1.0:
        raise ValueError(f"flip_rate = {flip_rate!r}; expected a fraction in [0, 1]")
    if isinstance(length_skew, bool) or not isinstance(length_skew, (int, np.integer)):
        raise ValueError(f"length_skew = {length_skew!r}; expected an int (filler characters, sign = which side)")
    flips = np.random.default_rng([seed, 0xF11B]).uniform(size=len(pairs)) < flip_rate
    out = []
    for p, flip in zip(map(_as_pair, pairs), flips):
        c = p.chosen + FILLER * max(length_skew, 0)
        r = p.rejected + FILLER * max(-length_skew, 0)
        out.append(Pair(p.prompt, r, c, True) if flip else Pair(p.prompt, c, r, False))
    return out, pair_stats(out)


def kto_rows(pairs: Iterable[Pair | tuple]) -> list[tuple[str, str, bool]]:
    """Unpaired KTO rows from pairs: (prompt, chosen, True) and (prompt, rejected, False) for each pair."""
    rows = []
    for p in map(_as_pair, pairs):
        rows += [(p.prompt, p.chosen, True), (p.prompt, p.rejected, False)]
    return rows


def _as_pair(p) -> Pair:
    if isinstance(p, Pair):
        return p
    if isinstance(p, (tuple, list)) and len(p) == 3 and all(isinstance(s, str) for s in p):
        return Pair(*p)
    raise ValueError(f"pair {p!r}: expected a Pair or a (prompt, chosen, rejected) tuple of str")


def encode_pairs(
    pairs: Iterable[Pair | tuple],
    tokenizer: Tokenizer | str = "arith",
    seq_len: int = 64,
    *,
    too_long: str = "error",
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Fixed-shape arrays of the pairs' chosen and rejected sequences, and counts of the rows kept and dropped.

    Returns ({chosen_tokens, chosen_mask, rejected_tokens, rejected_mask: [N, T], flipped: [N]}, {"pairs",
    "dropped_empty", "dropped_identical"}). A row whose chosen or rejected completion is empty, or whose chosen
    equals its rejected, is dropped (it carries no preference) and counted.
    """
    tok = get_tokenizer(tokenizer)
    rows, empty, same = [], 0, 0
    for p in map(_as_pair, pairs):
        if not p.chosen or not p.rejected:
            empty += 1
        elif p.chosen == p.rejected:
            same += 1
        else:
            rows.append(p)
    stats = dict(pairs=len(rows), dropped_empty=empty, dropped_identical=same)
    if not rows:
        raise ValueError(f"encode_pairs: no usable pair ({stats}); expected non-empty, distinct chosen/rejected")
    out: dict[str, list] = {k: [] for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")}
    for p in rows:
        for side, completion in (("chosen", p.chosen), ("rejected", p.rejected)):
            ex = data.encode_text_example((p.prompt, completion), tok, seq_len, "completion", too_long)
            out[f"{side}_tokens"].append(ex["tokens"])
            out[f"{side}_mask"].append(ex["loss_mask"])
    arrays = {k: np.stack(v) for k, v in out.items()}
    arrays["flipped"] = np.asarray([p.flipped for p in rows], np.int32)
    return arrays, stats


def encode_kto(
    rows: Sequence[tuple[str, str, bool]],
    tokenizer: Tokenizer | str = "arith",
    seq_len: int = 64,
    *,
    too_long: str = "error",
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Arrays for KTO: tokens/mask [N, T], desirable [N], and kl_tokens/kl_mask [N, T] pairing each prompt with the
    completion of the next row that has a different prompt (cyclically; the mismatched pairs of the KL estimate z₀:
    `kto_rows` puts a pair's two rows next to each other, and a matched prompt would not estimate the KL). Empty
    completions are dropped and counted."""
    tok = get_tokenizer(tokenizer)
    kept = [r for r in rows if r[1]]
    stats = dict(rows=len(kept), dropped_empty=len(rows) - len(kept))
    if len(kept) < 2:
        raise ValueError(f"encode_kto: {len(kept)} usable rows; expected >= 2 (the KL estimate pairs rows)")
    n = len(kept)
    out: dict[str, list] = {k: [] for k in ("tokens", "mask", "kl_tokens", "kl_mask")}
    for i, (prompt, completion, _) in enumerate(kept):
        j = next((j % n for j in range(i + 1, i + n) if kept[j % n][0] != prompt), (i + 1) % n)
        for prefix, c in (("", completion), ("kl_", kept[j][1])):
            ex = data.encode_text_example((prompt, c), tok, seq_len, "completion", too_long)
            out[f"{prefix}tokens"].append(ex["tokens"])
            out[f"{prefix}mask"].append(ex["loss_mask"])
    arrays = {k: np.stack(v) for k, v in out.items()}
    arrays["desirable"] = np.asarray([bool(r[2]) for r in kept], np.int32)
    return arrays, stats
