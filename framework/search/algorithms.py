"""Test-time search over a policy with a verifier: majority vote, best-of-N (naive, weighted), beam search, DVTS,
lookahead; step-score aggregation last / min / product.

Every depth of every strategy makes one `policy.extend` call and one `scorer.score` call over all candidates of all
problems together (no per-candidate or per-problem loop around the model). Row randomness is keyed
(seed, problem id, depth, phase, slot) with the problem id a hash of its prompt, so a policy that draws per row
gives the same result for a problem whether it is searched alone or in a batch.

Beam search follows search-and-learn: N beams; at each depth every active beam writes one line, candidates that
finished (answer line, or the line cap) leave the pool, the best N/M of the rest (by aggregated PRM score) are each
continued M ways; it stops when N candidates have finished. DVTS runs N/M independent subtrees, each a greedy
search of width M (M candidate lines per depth, the best kept). Lookahead k scores each candidate line by the PRM at
the end of a k-line greedy rollout from it (the rollout is thrown away, its tokens are counted).
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from framework.models import lm
from framework.search.policy import max_lines
from framework.tasks import arithmetic
from framework.verifiers import traces

STRATEGIES = ("greedy", "majority", "best_of_n", "weighted_best_of_n", "beam", "dvts")
AGGREGATIONS = ("last", "min", "product")
SELECTIONS = ("best", "weighted")
NEEDS_SCORER = ("best_of_n", "weighted_best_of_n", "beam", "dvts")


def aggregate(scores: np.ndarray, how: str = "last") -> float:
    """One number for a trace from its line scores: the last, the minimum or the product (0 for no lines)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r}; expected one of {AGGREGATIONS}")
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return 0.0
    return float(s[-1] if how == "last" else s.min() if how == "min" else np.prod(s))


def answer_of(problem: arithmetic.Problem, completion: str) -> int | None:
    """The answer a completion states (None if it has no parseable answer line)."""
    return arithmetic.check_solution(problem, traces.truncate_after_answer(completion)).answer


def vote(answers: Sequence[int | None], weights: Sequence[float] | None = None) -> tuple[int | None, int]:
    """(winning answer, index of the first candidate giving it): most (weighted) votes; None answers never vote.

    Ties go to the answer seen first. Returns (None, 0) when no candidate has an answer.
    """
    weights = np.ones(len(answers)) if weights is None else np.asarray(weights, np.float64)
    total: dict[int, float] = collections.defaultdict(float)
    first: dict[int, int] = {}
    for i, (a, w) in enumerate(zip(answers, weights)):
        if a is not None:
            total[a] += float(w)
            first.setdefault(a, i)
    if not total:
        return None, 0
    best = max(total, key=lambda a: (total[a], -first[a]))
    return best, first[best]


@dataclasses.dataclass
class SearchResults:
    """What `run` returns: per problem the chosen answer and trace, the final candidate pool, and compute spent.

    tokens_generated / tokens_prompt: policy tokens sampled / read as prompt (prefill) per problem;
    tokens_scored: verifier tokens read per problem. policy_calls / scorer_calls: every model call's rows, as
    (problem ids, prompt tokens, new tokens) and (problem ids, tokens scored) arrays, for `flops`.
    """

    strategy: str
    n: int
    m: int | None
    lookahead: int
    aggregation: str
    answers: list[int | None]
    traces: list[str]
    scores: list[float]
    candidates: list[list[str]]
    candidate_scores: list[list[float]]
    tokens_generated: np.ndarray
    tokens_prompt: np.ndarray
    tokens_scored: np.ndarray
    revisions: int = 0  # sequential revision (`framework.search.revision.revise`): retractions allowed per chain
    policy_calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    scorer_calls: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)

    def correct(self, problems: Sequence[arithmetic.Problem]) -> np.ndarray:
        """Bool per problem: the chosen answer is the gold answer."""
        return np.asarray([a is not None and a == p.answer for a, p in zip(self.answers, problems)])

    def accuracy(self, problems: Sequence[arithmetic.Problem]) -> float:
        """Fraction of problems answered right."""
        return float(np.mean(self.correct(problems)))

    def flops(self, policy, verifier=None) -> float:
        """Inference FLOPs of the whole search: `flops_per_problem` summed over problems."""
        return float(self.flops_per_problem(policy, verifier).sum())

    def flops_per_problem(self, policy, verifier=None) -> np.ndarray:
        """Inference FLOPs spent on each problem [P]: the policy's calls plus the verifier's passes.

        `policy` / `verifier`: the model's config (`LMConfig` or its mapping) or a handle holding it as `.cfg`
        (`LMPolicy`, `Verifier`); `verifier=None` counts no verifier. Each policy row costs
        `lm.flops(cfg, its prompt tokens, its new tokens)` and each scored trace `lm.flops(cfg, its tokens, 0)`:
        Lumen's one convention (`framework.models.cost`), prefill and attention included, every call priced on its
        own (a search re-reads a growing prefix at each depth). A verifier's value head (D + 1 weights read once per
        line) is left out, as the convention leaves out norms and the embedding gather.
        """
        out = np.zeros(len(self.answers), np.float64)
        policy_cfg = _cost_model(policy, "policy")
        self._check_calls(self.policy_calls, self.tokens_generated, "policy_calls")
        for pids, prompt, new in self.policy_calls:
            np.add.at(out, pids, lm.flops(policy_cfg, prompt, new))
        if verifier is not None:
            verifier_cfg = _cost_model(verifier, "verifier")
            self._check_calls(self.scorer_calls, self.tokens_scored, "scorer_calls")
            for pids, tokens in self.scorer_calls:
                np.add.at(out, pids, lm.flops(verifier_cfg, tokens, 0))
        return out

    def _check_calls(self, calls, tokens: np.ndarray, name: str) -> None:
        if tokens.sum() and not calls:
            raise ValueError(
                f"SearchResults.flops: these results spent {int(tokens.sum())} tokens but carry no {name} (each "
                f"model call's rows, which `search.run` and `revision.revise` record); fill SearchResults.{name}"
            )


def _cost_model(model, name: str) -> lm.LMConfig:
    """The LMConfig to price `model` with: the model's config, or the `.cfg` of a handle holding one."""
    cfg = getattr(model, "cfg", model)
    try:
        return lm.LMConfig.from_config(cfg)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"SearchResults.flops: {name} must be a model config (LMConfig or its mapping) or a handle with .cfg "
            f"(LMPolicy, Verifier); got {model!r} ({e})"
        ) from None


class _Ctx:
    """One search call: the model handles, row keys, and per-problem token counters."""

    def __init__(self, policy, scorer, problems, seed: int, aggregation: str, slack: int):
        self.policy, self.scorer, self.problems, self.seed, self.agg = policy, scorer, list(problems), seed, aggregation
        self.uids = [zlib.crc32(arithmetic.format_prompt(p).encode()) for p in self.problems]
        self.caps = [max_lines(p, slack) for p in self.problems]
        P = len(self.problems)
        self.gen, self.prompt, self.scored = (np.zeros(P, np.int64) for _ in range(3))
        self.policy_calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.scorer_calls: list[tuple[np.ndarray, np.ndarray]] = []

    def extend(self, pids, texts, slots, depth, phase, *, until="line", greedy=False) -> list[str]:
        if not pids:
            return []
        keys = [(self.seed, self.uids[p], depth, phase, s) for p, s in zip(pids, slots)]
        out = self.policy.extend(
            [self.problems[p] for p in pids],
            list(texts),
            until=until,
            greedy=greedy,
            row_keys=keys,
            call_key=(self.seed, depth, phase),
        )
        np.add.at(self.gen, pids, out.tokens)
        np.add.at(self.prompt, pids, out.prompt_tokens)
        self.policy_calls.append((np.asarray(pids), np.asarray(out.prompt_tokens), np.asarray(out.tokens)))
        return out.texts

    def score(self, pids, texts) -> list[np.ndarray]:
        if not pids:
            return []
        out = self.scorer.score([self.problems[p] for p in pids], list(texts))
        np.add.at(self.scored, pids, out.tokens)
        self.scorer_calls.append((np.asarray(pids), np.asarray(out.tokens)))
        return out.scores

    def done(self, pid: int, text: str) -> bool:
        return traces.is_finished(text) or len(traces.split_lines(text)) >= self.caps[pid]


def _sample_full(ctx: _Ctx, n: int) -> tuple[list[int], list[str]]:
    P = len(ctx.problems)
    pids = [p for p in range(P) for _ in range(n)]
    slots = [s for _ in range(P) for s in range(n)]
    return pids, ctx.extend(pids, [""] * len(pids), slots, 0, 0, until="answer")


def _expand(ctx: _Ctx, rows: list[tuple[int, str, int]], depth: int, lookahead: int):
    """Writes one line for every (pid, text, slot) row; returns (texts, line scores, selection scores)."""
    pids = [r[0] for r in rows]
    texts = [
        t + new for (_, t, _), new in zip(rows, ctx.extend(pids, [r[1] for r in rows], [r[2] for r in rows], depth, 0))
    ]
    probe = list(texts)
    for j in range(lookahead):  # greedy rollouts from the unfinished candidates, batched per lookahead step
        todo = [i for i, t in enumerate(probe) if not ctx.done(pids[i], t)]
        new = ctx.extend(
            [pids[i] for i in todo], [probe[i] for i in todo], [rows[i][2] for i in todo], depth, 1 + j, greedy=True
        )
        for i, x in zip(todo, new):
            probe[i] += x
    scores = ctx.score(pids, probe)
    own = [s[: len(traces.split_lines(t))] for s, t in zip(scores, texts)]
    return texts, own, [aggregate(s, ctx.agg) for s in scores]


def _choose(ctx: _Ctx, pid: int, pool: list[tuple[str, np.ndarray]], select: str):
    problem = ctx.problems[pid]
    agg = [aggregate(s, ctx.agg) for _, s in pool]
    answers = [answer_of(problem, t) for t, _ in pool]
    if select == "weighted":
        ans, i = vote(answers, agg)
        # The trace shown is the best-scored one among those giving the winning answer.
        same = [j for j, a in enumerate(answers) if a == ans] or [i]
        i = max(same, key=lambda j: (agg[j], -j))
    else:
        i = int(np.argmax(agg)) if agg else 0
        ans = answers[i] if answers else None
    return ans, pool[i][0] if pool else "", agg[i] if agg else 0.0, [t for t, _ in pool], agg


def _beam(ctx: _Ctx, n: int, m: int, lookahead: int, select: str):
    P, keep = len(ctx.problems), n // m
    active = [[("", s) for s in range(n)] for _ in range(P)]  # (text, slot)
    finished: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(P)]
    depth = 0
    while any(active):
        rows = [(p, t, s) for p in range(P) for t, s in active[p]]
        texts, own, sel = _expand(ctx, rows, depth, lookahead)
        by_p: dict[int, list[tuple[float, int, str, np.ndarray]]] = collections.defaultdict(list)
        for i, ((p, _, _), t) in enumerate(zip(rows, texts)):
            if ctx.done(p, t):
                finished[p].append((t, own[i]))
            else:
                by_p[p].append((sel[i], i, t, own[i]))
        for p in range(P):
            live = sorted(by_p.get(p, []), key=lambda c: (-c[0], c[1]))[:keep]
            if len(finished[p]) >= n or not live:
                active[p] = []
                continue
            reps = -(-n // len(live))
            active[p] = [(c[2], s) for s, c in enumerate(c for c in live for _ in range(reps))][:n]
        depth += 1
    return [_choose(ctx, p, finished[p], select) for p in range(P)]


def _dvts(ctx: _Ctx, n: int, m: int, lookahead: int, select: str):
    P, g = len(ctx.problems), n // m
    current = [[""] * g for _ in range(P)]
    leaves: list[list[tuple[str, np.ndarray] | None]] = [[None] * g for _ in range(P)]
    depth = 0
    while True:
        rows, owner = [], []
        for p in range(P):
            for k in range(g):
                if leaves[p][k] is None:
                    rows += [(p, current[p][k], k * m + j) for j in range(m)]
                    owner += [(p, k)] * m
        if not rows:
            break
        texts, own, sel = _expand(ctx, rows, depth, lookahead)
        best: dict[tuple[int, int], int] = {}
        for i, key in enumerate(owner):
            if key not in best or sel[i] > sel[best[key]]:
                best[key] = i
        for (p, k), i in best.items():
            if ctx.done(p, texts[i]):
                leaves[p][k] = (texts[i], own[i])
            else:
                current[p][k] = texts[i]
        depth += 1
    return [_choose(ctx, p, leaves[p], select) for p in range(P)]


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"search.run: {name} must be an int >= {lo}, got {v!r}")
    return int(v)


def run(
    strategy: str,
    policy,
    scorer,
    problems: Sequence[arithmetic.Problem],
    *,
    n: int,
    m: int | None = None,
    lookahead: int = 0,
    seed: int = 0,
    aggregation: str = "last",
    select: str | None = None,
    slack_lines: int = 2,
) -> SearchResults:
    """Searches every problem with `strategy` at budget `n` (samples / beams); see the module docstring.

    Args:
      strategy: one of STRATEGIES. "greedy" ignores n; "majority" needs no scorer.
      policy: has `extend(...)` (`framework.search.LMPolicy`, `framework.search.toy.ToyPolicy`).
      scorer: has `score(problems, completions) -> Scores` (`framework.verifiers.Verifier`, a toy oracle), or None.
      n: number of samples (best-of-N, majority) or beams (beam, DVTS).
      m: beam width (beam: keep n/m beams, each continued m ways; DVTS: n/m subtrees of width m); n % m == 0.
      lookahead: k-line greedy rollouts scored in place of a candidate line (beam and DVTS).
      aggregation: how line scores become one score: "last", "min" or "product".
      select: how beam/DVTS pick among finished candidates: "best" (default) or "weighted" (answer voting).
      slack_lines: lines past K + 1 a trace may write before it counts as finished (without an answer).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"search.run: strategy {strategy!r}; expected one of {STRATEGIES}")
    n = _check_int("n", n, 1)
    lookahead = _check_int("lookahead", lookahead, 0)
    _check_int("slack_lines", slack_lines, 0)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"search.run: aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    select = select or "best"
    if select not in SELECTIONS:
        raise ValueError(f"search.run: select {select!r}; expected one of {SELECTIONS}")
    if strategy in ("beam", "dvts"):
        if m is None:
            raise ValueError(f"search.run: strategy {strategy!r} needs the beam width m")
        m = _check_int("m", m, 1)
        if m > n or n % m:
            raise ValueError(f"search.run: n={n} must be a multiple of m={m} (n/m beams kept or subtrees)")
    elif lookahead:
        raise ValueError(f"search.run: lookahead={lookahead} applies to beam and dvts, not {strategy!r}")
    if strategy in NEEDS_SCORER and scorer is None:
        raise ValueError(f"search.run: strategy {strategy!r} needs a scorer (a PRM/ORM), got None")
    if not len(problems):
        raise ValueError("search.run: no problems")
    ctx = _Ctx(policy, scorer, problems, _check_int("seed", seed, 0), aggregation, slack_lines)
    P = len(ctx.problems)

    if strategy in ("greedy", "majority", "best_of_n", "weighted_best_of_n"):
        if strategy == "greedy":
            pids = list(range(P))
            texts = ctx.extend(pids, [""] * P, [0] * P, 0, 0, until="answer", greedy=True)
            n_per = 1
        else:
            pids, texts = _sample_full(ctx, n)
            n_per = n
        scored = strategy in ("best_of_n", "weighted_best_of_n")
        scores = ctx.score(pids, texts) if scored else [np.zeros(0)] * len(texts)
        chosen = []
        for p in range(P):
            pool = list(zip(texts[p * n_per : (p + 1) * n_per], scores[p * n_per : (p + 1) * n_per]))
            if strategy in ("greedy", "majority"):
                answers = [answer_of(ctx.problems[p], t) for t, _ in pool]
                ans, i = vote(answers)
                agg = [aggregate(s, aggregation) for _, s in pool]
                chosen.append((ans, pool[i][0], agg[i], [t for t, _ in pool], agg))
            else:
                chosen.append(_choose(ctx, p, pool, "weighted" if strategy == "weighted_best_of_n" else "best"))
    elif strategy == "beam":
        chosen = _beam(ctx, n, m, lookahead, select)
    else:
        chosen = _dvts(ctx, n, m, lookahead, select)

    return SearchResults(
        strategy=strategy,
        n=n,
        m=m,
        lookahead=lookahead,
        aggregation=aggregation,
        answers=[c[0] for c in chosen],
        traces=[c[1] for c in chosen],
        scores=[c[2] for c in chosen],
        candidates=[c[3] for c in chosen],
        candidate_scores=[c[4] for c in chosen],
        tokens_generated=ctx.gen,
        tokens_prompt=ctx.prompt,
        tokens_scored=ctx.scored,
        policy_calls=ctx.policy_calls,
        scorer_calls=ctx.scorer_calls,
    )
