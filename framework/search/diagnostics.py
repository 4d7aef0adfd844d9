"""Ceilings and diagnostics of test-time search: gold-path pass@N, selection accuracy, gaps, standard errors.

Glossary: P problems, S samples in a problem's pool, N samples a selector sees.

On the arithmetic task a sample can state the right answer through a wrong process (with M possible answers, a wrong
chain lands on the right one about 1/M of the time), so answer pass@N overstates what any process verifier can reach.
The true ceiling for a perfect PRM is gold-path pass@N: the fraction of problems with at least one sample whose every
step is on the gold path (`on_gold_path`, from the exact checker). Each selector's gap to that ceiling, and a PRM's
selection accuracy -- P(its top-scored sample is on the gold path | the pool holds one) -- tell apart "the samples hold
no gold trace" (low ceiling) from "the verifier cannot rank" (high ceiling, low selection accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from framework.search.algorithms import SearchResults, aggregate, vote
from framework.search.revision import resolve
from framework.tasks import arithmetic
from framework.verifiers import traces


def on_gold_path(problem: arithmetic.Problem, completion: str) -> bool:
    """True when the completion writes exactly the gold steps and the right answer line (the checker's verdict)."""
    check = arithmetic.check_solution(problem, traces.truncate_after_answer(completion))
    return check.process_correct and check.answer_correct


def gold_flags(problems: Sequence[arithmetic.Problem], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Per problem, a bool [S] array: which of its candidate completions are on the gold path."""
    if len(problems) != len(candidates):
        raise ValueError(f"gold_flags: {len(problems)} problems but {len(candidates)} candidate lists")
    return [np.asarray([on_gold_path(p, c) for c in cands], bool) for p, cands in zip(problems, candidates)]


def selection_accuracy(
    line_scores: Sequence[Sequence[np.ndarray]], on_gold: Sequence[np.ndarray], aggregation: str = "last"
) -> dict[str, float]:
    """P(the top-scored sample is on the gold path | the pool holds a gold-path sample), over problems.

    `line_scores[p][s]` are sample s's line scores, aggregated to one number by `aggregation`. Ties at the top count
    by the share of tied samples on the gold path (the expected hit under a random tie-break). Returns
    {"selection_accuracy", "problems_with_gold", "problems"}; the accuracy is NaN when no pool holds a gold sample.
    """
    if len(line_scores) != len(on_gold):
        raise ValueError(f"selection_accuracy: {len(line_scores)} score lists but {len(on_gold)} flag arrays")
    hits = []
    for p, (scores, flags) in enumerate(zip(line_scores, on_gold)):
        flags = np.asarray(flags, bool)
        if len(scores) != flags.size:
            raise ValueError(f"selection_accuracy: problem {p} has {len(scores)} scored samples but {flags.size} flags")
        if not flags.any():
            continue
        agg = np.asarray([aggregate(s, aggregation) for s in scores])
        top = agg >= agg.max() - 1e-12
        hits.append(float(flags[top].mean()))
    return {
        "selection_accuracy": float(np.mean(hits)) if hits else float("nan"),
        "problems_with_gold": len(hits),
        "problems": len(on_gold),
    }


def subsample_pool(
    answers: Sequence[Sequence[int | None]],
    line_scores: Sequence[Sequence[np.ndarray]],
    on_gold: Sequence[np.ndarray],
    gold: Sequence[int],
    n: int,
    rng: np.random.Generator,
    aggregation: str = "last",
) -> dict[str, np.ndarray]:
    """Selectors and ceilings per problem [P] from N samples drawn without replacement from each pool.

    Keys: "majority", "best_of_n", "weighted_best_of_n" (the selected answer is right), "pass_at_n" (some answer
    is right), "gold_pass_at_n" (some sample is on the gold path: the ceiling of a perfect PRM),
    "best_of_n_on_gold", "weighted_best_of_n_on_gold" (the selected trace is on the gold path; weighted BoN shows the
    best-scored trace of the winning answer).
    """
    keys = ("majority", "best_of_n", "weighted_best_of_n", "pass_at_n", "gold_pass_at_n")
    out = {k: np.zeros(len(answers), bool) for k in keys + ("best_of_n_on_gold", "weighted_best_of_n_on_gold")}
    for p, (ans, scores, flags, g) in enumerate(zip(answers, line_scores, on_gold, gold)):
        idx = rng.choice(len(ans), size=n, replace=False)
        a = [ans[i] for i in idx]
        f = np.asarray(flags, bool)[idx]
        s = [aggregate(scores[i], aggregation) for i in idx]
        best = int(np.argmax(s))
        out["majority"][p] = vote(a)[0] == g
        out["best_of_n"][p] = a[best] == g
        out["best_of_n_on_gold"][p] = f[best]
        w, _ = vote(a, s)
        out["weighted_best_of_n"][p] = w == g
        same = [j for j, x in enumerate(a) if x == w]
        out["weighted_best_of_n_on_gold"][p] = bool(same) and f[max(same, key=lambda j: (s[j], -j))]
        out["pass_at_n"][p] = any(x == g for x in a)
        out["gold_pass_at_n"][p] = f.any()
    return out


def search_diagnostics(results: SearchResults, problems: Sequence[arithmetic.Problem]) -> dict[str, np.ndarray]:
    """Per problem [P] of a search run: answer right, chosen trace on the gold path, and the run's own ceilings.

    Keys: "correct", "chosen_on_gold", "answer_ceiling" (some final candidate states the right answer) and
    "gold_ceiling" (some final candidate is on the gold path: what a perfect final selection would reach).
    """
    if len(problems) != len(results.answers):
        raise ValueError(f"search_diagnostics: {len(problems)} problems but {len(results.answers)} results")
    # Sequential revision's traces hold retracted lines: the checker reads what they resolve to.
    read = resolve if results.strategy == "revision" else (lambda t: t)
    cands = [[read(c) for c in cs] for cs in results.candidates]
    answer_ok = [
        [arithmetic.check_solution(p, traces.truncate_after_answer(c)).answer_correct for c in cs]
        for p, cs in zip(problems, cands)
    ]
    return {
        "correct": results.correct(problems),
        "chosen_on_gold": np.asarray([on_gold_path(p, read(t)) for p, t in zip(problems, results.traces)], bool),
        "answer_ceiling": np.asarray([any(a) for a in answer_ok], bool),
        "gold_ceiling": np.asarray([f.any() for f in gold_flags(problems, cands)], bool),
    }


def mean_se(x) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-problem values; SE is NaN with fewer than two values."""
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se


def paired_difference(a, b) -> tuple[float, float]:
    """(mean of a - b, its standard error) over problems: the paired comparison of two methods on one problem set."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} values against {b.size}")
    return mean_se(a - b)


def interpolate_at_flops(flops: Sequence[float], values: Sequence[np.ndarray], budget: float) -> np.ndarray:
    """Per-problem values of a curve (e.g. weighted BoN at each N) at `budget` FLOPs, linear in log FLOPs.

    `flops` must increase; a budget outside the curve's range is clipped to its ends (the caller reports that).
    """
    f = np.log(np.asarray(flops, np.float64))
    if f.size == 0 or np.any(np.diff(f) <= 0):
        raise ValueError(f"interpolate_at_flops: flops must be non-empty and increasing, got {list(flops)}")
    v = np.asarray([np.asarray(x, np.float64) for x in values])
    x = float(np.clip(np.log(budget), f[0], f[-1]))
    i = int(np.clip(np.searchsorted(f, x) - 1, 0, max(f.size - 2, 0)))
    if f.size == 1:
        return v[0]
    t = (x - f[i]) / (f[i + 1] - f[i])
    return (1 - t) * v[i] + t * v[i + 1]
