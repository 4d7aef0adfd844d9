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

from typing import NamedTuple, Sequence

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


def monte_carlo_labels(
    policy,
    problems: Sequence[arithmetic.Problem],
    completions: Sequence[str],
    *,
    n_rollouts: int,
    seed: int = 0,
) -> MCLabels:
    """Math-Shepherd labels: `n_rollouts` policy completions from every step prefix, all in one batched call."""
    if isinstance(n_rollouts, bool) or not isinstance(n_rollouts, int) or n_rollouts < 1:
        raise ValueError(f"monte_carlo_labels: n_rollouts must be an int >= 1, got {n_rollouts!r}")
    if len(problems) != len(completions):
        raise ValueError(f"monte_carlo_labels: {len(problems)} problems but {len(completions)} completions")
    rows_p, rows_prefix, rows_where, keys = [], [], [], []
    hard, soft = [], []
    for t, (p, c) in enumerate(zip(problems, completions)):
        lines = traces.split_lines(traces.truncate_after_answer(c))
        h = np.full(len(lines), np.nan, np.float32)
        for j, line in enumerate(lines):
            if traces.is_answer_line(line):
                h[j] = outcome_label(p, c)
                continue
            for r in range(n_rollouts):
                rows_p.append(p)
                rows_prefix.append(_prefix(lines, j))
                rows_where.append((t, j))
                keys.append((seed, t, j, r))
        hard.append(h)
        soft.append(h.copy())
    tokens = 0
    if rows_p:
        out = policy.extend(rows_p, rows_prefix, until="answer", row_keys=keys, call_key=(seed, 1))
        tokens = int(np.sum(out.tokens))
        right = np.zeros((len(problems), max(len(h) for h in hard)), np.float32)
        for (t, j), p, prefix, new in zip(rows_where, rows_p, rows_prefix, out.texts):
            right[t, j] += outcome_label(p, prefix + new)
        for t, (h, s) in enumerate(zip(hard, soft)):
            todo = np.isnan(h)
            s[todo] = right[t, : len(h)][todo] / n_rollouts
            h[todo] = (right[t, : len(h)][todo] > 0).astype(np.float32)
    return MCLabels(hard, soft, len(rows_p), tokens)


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
