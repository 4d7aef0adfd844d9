"""Step labels for verifier training: gold (the exact checker), Monte-Carlo (Math-Shepherd) and consensus.

Every labeller returns one float vector per trace with one entry per finished line (step lines, then the answer
line; lines after the first answer line are not labelled), NaN where a line has no label. The label of line j says
"the trace up to and including line j can still end right":

  gold          line j is on the gold path: steps 0..j are all correct (checker's `on_gold_path`); a step line
                past the K-th is wrong; the answer line is right iff every step is and the answer is.
  Monte-Carlo   from the prefix lines 0..j, `n_rollouts` completions by the policy; hard = any reaches the right
                answer, soft = the fraction that does (Math-Shepherd). The answer line's label is the trace's own
                answer verdict. MC never looks at steps, so a wrong step that happens to reach the right answer is
                labelled good: the noise the consensus filter is for.
  consensus     MC hard labels kept only where a judge agrees (Qwen's PRM lessons). The judge is a (larger) policy
                that rewrites line j greedily from the prefix lines 0..j-1; its verdict on line j is "every line so far
                equals what the judge wrote". No gold checker is involved.

Policies are duck-typed (see `framework.search.policy.LMPolicy`): `extend(problems, prefixes, until=..., greedy=...,
row_keys=..., call_key=...)` returns the new text of every row, in one batched call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from framework.tasks import arithmetic
from framework.verifiers import traces


def gold_labels(problem: arithmetic.Problem, completion: str) -> np.ndarray:
    """1/0 per finished line: is the trace still on the gold path after this line (exact checker)."""
    lines = traces.split_lines(traces.truncate_after_answer(completion))
    check = arithmetic.check_solution(problem, "".join(line + "\n" for line in lines))
    out, good = [], True
    for j, line in enumerate(lines):
        if traces.is_answer_line(line):
            good = good and j == problem.num_steps and check.answer_correct
        else:
            good = good and j < problem.num_steps and check.on_gold_path[j]
        out.append(float(good))
    return np.asarray(out, np.float32)


def outcome_label(problem: arithmetic.Problem, completion: str) -> float:
    """1/0: the completion's answer line states the right answer (what an ORM is trained on)."""
    return float(arithmetic.check_solution(problem, traces.truncate_after_answer(completion)).answer_correct)


def outcome_labels(problem: arithmetic.Problem, completion: str) -> np.ndarray:
    """ORM targets in line layout: NaN on every line but the last finished one, which holds `outcome_label`."""
    n = len(traces.split_lines(traces.truncate_after_answer(completion)))
    out = np.full(n, np.nan, np.float32)
    if n:
        out[-1] = outcome_label(problem, completion)
    return out


def first_error(labels: np.ndarray) -> int | None:
    """Index of the first line labelled 0 (< 0.5), None if there is none (ProcessBench's "no error" = -1)."""
    bad = np.flatnonzero(np.asarray(labels) < 0.5)
    return int(bad[0]) if bad.size else None


class MCLabels(NamedTuple):
    """Math-Shepherd labels per trace: hard (any rollout right), soft (fraction right); rollouts spent."""

    hard: list[np.ndarray]
    soft: list[np.ndarray]
    rollouts: int
    tokens_generated: int


def _prefix(lines: Sequence[str], j: int) -> str:
    return "".join(line + "\n" for line in lines[: j + 1])


def _check_rollouts(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name}: n_rollouts must be an int >= 1, got {n!r}")
    return int(n)


def monte_carlo_labels(
    policy,
    problems: Sequence[arithmetic.Problem],
    completions: Sequence[str],
    *,
    n_rollouts: int,
    seed: int = 0,
) -> MCLabels:
    """Math-Shepherd labels: `n_rollouts` policy completions from every step prefix, all in one batched call."""
    n = _check_rollouts("monte_carlo_labels", n_rollouts)
    return monte_carlo_label_sets(policy, problems, completions, ns=(n,), seed=seed)[n]


def monte_carlo_label_sets(
    policy,
    problems: Sequence[arithmetic.Problem],
    completions: Sequence[str],
    *,
    ns: Sequence[int],
    seed: int = 0,
) -> dict[int, MCLabels]:
    """Math-Shepherd labels for several rollout counts from one batched call of max(ns) rollouts per step prefix:
    the labels for n use each prefix's first n rollouts (independent draws, so a subset is an n-rollout estimate;
    the rollouts are shared, not re-drawn, which is what makes N_MC in {1, 4, 16} cost 16 rollouts, not 21)."""
    ns = sorted({_check_rollouts("monte_carlo_label_sets", n) for n in ns})
    if not ns:
        raise ValueError("monte_carlo_label_sets: ns is empty; expected rollout counts >= 1")
    if len(problems) != len(completions):
        raise ValueError(f"monte_carlo_labels: {len(problems)} problems but {len(completions)} completions")
    n_max = ns[-1]
    rows_p, rows_prefix, rows_where, keys = [], [], [], []
    base = []
    for t, (p, c) in enumerate(zip(problems, completions)):
        lines = traces.split_lines(traces.truncate_after_answer(c))
        h = np.full(len(lines), np.nan, np.float32)
        for j, line in enumerate(lines):
            if traces.is_answer_line(line):
                h[j] = outcome_label(p, c)
                continue
            for r in range(n_max):
                rows_p.append(p)
                rows_prefix.append(_prefix(lines, j))
                rows_where.append((t, j, r))
                keys.append((seed, t, j, r))
        base.append(h)
    width = max((len(h) for h in base), default=0)
    right = np.zeros((len(problems), max(width, 1), n_max), np.float32)  # [trace, line, rollout] reached the answer
    spent = np.zeros(n_max, np.int64)  # tokens generated by rollout index r
    if rows_p:
        out = policy.extend(rows_p, rows_prefix, until="answer", row_keys=keys, call_key=(seed, 1))
        for (t, j, r), p, prefix, new, k in zip(rows_where, rows_p, rows_prefix, out.texts, out.tokens):
            right[t, j, r] = outcome_label(p, prefix + new)
            spent[r] += int(k)
    per_rollout = len(rows_p) // n_max
    result = {}
    for n in ns:
        hard, soft = [], []
        hits = right[:, :, :n].sum(axis=2)
        for t, h in enumerate(base):
            todo = np.isnan(h)
            s, hh = h.copy(), h.copy()
            s[todo] = hits[t, : len(h)][todo] / n
            hh[todo] = (hits[t, : len(h)][todo] > 0).astype(np.float32)
            hard.append(hh)
            soft.append(s)
        result[n] = MCLabels(hard, soft, per_rollout * n, int(spent[:n].sum()))
    return result


class JudgeVerdicts(NamedTuple):
    """Per trace, per line: the judge's greedy rewrite of the line equals the written line; tokens spent."""

    line_ok: list[np.ndarray]
    tokens_generated: int


def judge_verdicts(judge, problems: Sequence[arithmetic.Problem], completions: Sequence[str]) -> JudgeVerdicts:
    """The judge policy rewrites every line greedily from the lines before it (one batched call)."""
    rows_p, rows_prefix, where, written = [], [], [], []
    counts = []
    for t, (p, c) in enumerate(zip(problems, completions)):
        lines = traces.split_lines(traces.truncate_after_answer(c))
        counts.append(len(lines))
        for j, line in enumerate(lines):
            rows_p.append(p)
            rows_prefix.append(_prefix(lines, j - 1))
            where.append((t, j))
            written.append(line + "\n")
    ok = [np.zeros(n, bool) for n in counts]
    tokens = 0
    if rows_p:
        out = judge.extend(rows_p, rows_prefix, until="line", greedy=True, row_keys=None, call_key=(0, 2))
        tokens = int(np.sum(out.tokens))
        for (t, j), w, new in zip(where, written, out.texts):
            ok[t][j] = new == w
    return JudgeVerdicts(ok, tokens)


def consensus_labels(mc_hard: Sequence[np.ndarray], judge_line_ok: Sequence[np.ndarray]) -> list[np.ndarray]:
    """MC hard labels where the judge's prefix verdict (all lines so far judged right) agrees; NaN elsewhere."""
    if len(mc_hard) != len(judge_line_ok):
        raise ValueError(f"consensus_labels: {len(mc_hard)} MC label vectors but {len(judge_line_ok)} judge vectors")
    out = []
    for t, (mc, ok) in enumerate(zip(mc_hard, judge_line_ok)):
        mc, ok = np.asarray(mc, np.float32), np.asarray(ok, bool)
        if mc.shape != ok.shape:
            raise ValueError(f"consensus_labels: trace {t} has {mc.size} MC labels but {ok.size} judge verdicts")
        judge = np.cumprod(ok).astype(np.float32)
        out.append(np.where(judge == mc, mc, np.nan).astype(np.float32))
    return out
