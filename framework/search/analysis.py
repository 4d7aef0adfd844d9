"""Analysis for test-time scaling studies: pass@k, coverage fits, difficulty bins, pool subsampling, compute-optimal
strategy selection.

Glossary: P problems, S samples per problem in a pool, C strategy configurations, N budgets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.special

from framework.search.algorithms import aggregate, vote


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(
        1.0
        - np.exp(
            scipy.special.gammaln(n - c + 1)
            - scipy.special.gammaln(n - c - k + 1)
            - scipy.special.gammaln(n + 1)
            + scipy.special.gammaln(n - k + 1)
        )
    )


def fit_coverage(ks: Sequence[float], coverage: Sequence[float]) -> dict[str, float]:
    """Fits coverage(k) = exp(a · k^b) (Large Language Monkeys' exponentiated power law) by least squares on
    log(-log coverage) = log(-a) + b log k; points with coverage 0 or 1 carry no information and are dropped.

    Returns {"a", "b", "points"}; a and b are NaN with fewer than two usable points.
    """
    k, c = np.asarray(ks, np.float64), np.asarray(coverage, np.float64)
    ok = (c > 0) & (c < 1)
    if ok.sum() < 2:
        return {"a": float("nan"), "b": float("nan"), "points": int(ok.sum())}
    b, log_neg_a = np.polyfit(np.log(k[ok]), np.log(-np.log(c[ok])), 1)
    return {"a": float(-np.exp(log_neg_a)), "b": float(b), "points": int(ok.sum())}


def coverage_curve(fit: dict[str, float], ks: Sequence[float]) -> np.ndarray:
    """The fitted coverage exp(a · k^b) at ks."""
    return np.exp(fit["a"] * np.asarray(ks, np.float64) ** fit["b"])


def difficulty_bins(ease: Sequence[float], n_bins: int = 5) -> np.ndarray:
    """Bin 1..n_bins per problem by quantiles of `ease` (e.g. oracle pass@1): bin 1 = easiest, n_bins = hardest.

    Ties are split by rank order (a stable sort), so the bins have equal sizes up to one problem.
    """
    ease = np.asarray(ease, np.float64)
    order = np.argsort(-ease, kind="stable")
    bins = np.empty(len(ease), np.int64)
    bins[order] = 1 + (np.arange(len(ease)) * n_bins) // max(len(ease), 1)
    return bins


def subsample_pool(
    answers: Sequence[Sequence[int | None]],
    line_scores: Sequence[Sequence[np.ndarray]],
    gold: Sequence[int],
    n: int,
    rng: np.random.Generator,
    aggregation: str = "last",
) -> dict[str, np.ndarray]:
    """Majority / best-of-N / weighted best-of-N / pass@N correctness per problem from N of each pool's samples.

    The N samples are drawn without replacement from each problem's pool (search-and-learn's protocol).
    """
    out = {k: np.zeros(len(answers), bool) for k in ("majority", "best_of_n", "weighted_best_of_n", "pass_at_n")}
    for p, (ans, scores, g) in enumerate(zip(answers, line_scores, gold)):
        idx = rng.choice(len(ans), size=n, replace=False)
        a = [ans[i] for i in idx]
        s = [aggregate(scores[i], aggregation) for i in idx]
        out["majority"][p] = vote(a)[0] == g
        out["best_of_n"][p] = a[int(np.argmax(s))] == g
        out["weighted_best_of_n"][p] = vote(a, s)[0] == g
        out["pass_at_n"][p] = any(x == g for x in a)
    return out


def compute_optimal(
    correct: dict[str, np.ndarray], bins: np.ndarray, select_mask: np.ndarray
) -> tuple[dict[int, str], np.ndarray]:
    """Per difficulty bin, the configuration with the best accuracy on the selection problems (`select_mask`);
    returns ({bin: chosen name}, per-problem correctness of the chosen configuration). Ties go to the first name.

    `correct` maps a configuration name to a [P] array (all at one compute budget): bool, or the fraction of seeds
    on which each problem was right; the result keeps that scale (a fraction is never rounded to right/wrong).
    """
    names = list(correct)
    if not names:
        raise ValueError("compute_optimal: no configurations")
    chosen, out = {}, np.zeros(len(bins), np.result_type(*(np.asarray(v) for v in correct.values())))
    for b in np.unique(bins):
        sel = (bins == b) & select_mask
        accs = [float(np.mean(correct[k][sel])) if sel.any() else 0.0 for k in names]
        best = names[int(np.argmax(accs))]
        chosen[int(b)] = best
        out[bins == b] = correct[best][bins == b]
    return chosen, out


def compute_optimal_at_flops(
    correct: dict[str, np.ndarray],
    flops: dict[str, float],
    budget: float,
    bins: np.ndarray,
    select_mask: np.ndarray,
) -> tuple[dict[int, str], np.ndarray]:
    """`compute_optimal` among the configurations whose FLOPs per problem fit in `budget` (Snell et al.'s
    compute-optimal scaling at equal compute: every (strategy, N, M, serial:parallel split) that costs no more).

    `correct` maps a configuration name (e.g. "beam@16") to a bool [P] array, `flops` the same names to their mean
    FLOPs per problem. ValueError when nothing fits.
    """
    missing = sorted(set(correct) - set(flops))
    if missing:
        raise ValueError(f"compute_optimal_at_flops: no FLOPs for {missing}")
    fits = {k: v for k, v in correct.items() if flops[k] <= budget * (1 + 1e-9)}
    if not fits:
        raise ValueError(f"compute_optimal_at_flops: no configuration costs <= {budget:.3g} FLOPs per problem")
    return compute_optimal(fits, bins, select_mask)


def flops_to_match(accuracy: float, curve: dict[float, float]) -> float:
    """The fewest FLOPs at which a reference curve ({FLOPs: accuracy}, e.g. best-of-N) reaches `accuracy`; inf if
    it never does (how much more compute the reference needs to match a compute-optimal point)."""
    hit = [f for f, a in curve.items() if a >= accuracy - 1e-12]
    return float(min(hit)) if hit else float("inf")
