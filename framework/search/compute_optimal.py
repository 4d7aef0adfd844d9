"""Compute-optimal strategy selection tables (Snell et al.): per difficulty bin, per N and at equal FLOPs.

Glossary: P problems, N budget.

For each kind of difficulty bins (e.g. oracle pass@1, PRM mean score) the configuration is chosen per bin on a
selection subset of the problems and scored on the rest (`select` marks the selection subset). Per N the candidates
are all strategies at that N; at equal FLOPs they are every (strategy, N, M, serial:parallel split) that costs no
more than the reference (weighted best-of-N, else best-of-N) at N, and the row reports the reference curves at the
same FLOPs and the FLOPs each would need to match.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from framework.search import analysis

REFERENCES = ("best_of_n", "weighted_best_of_n", "majority")
CEILINGS = ("pass_at_n",)  # never candidates: they select nothing


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def _se(x) -> float:
    """Standard error of the mean over problems (NaN below two)."""
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def tables(
    correct: dict[str, dict[int, np.ndarray]],
    flops: dict[str, dict[int, float]],
    bins: dict[str, np.ndarray],
    select: np.ndarray,
    budgets: Sequence[int],
) -> tuple[dict, dict]:
    """({bin kind: {N: row}} per N, {bin kind: {N: row}} at equal FLOPs), both judged on the problems not in
    `select`. `correct[name][N]` is per-problem correctness [P], `flops[name][N]` FLOPs per problem."""
    per_n, at_flops = {}, {}
    ref_name = "weighted_best_of_n" if "weighted_best_of_n" in correct else "best_of_n"
    names = [k for k in correct if k not in CEILINGS]
    configs = {f"{k}@{n}": v for k in names for n, v in correct[k].items()}
    config_flops = {f"{k}@{n}": flops[k][n] for k in names for n in correct[k]}
    ev = ~select
    for kind, bb in bins.items():
        per_n[kind], at_flops[kind] = {}, {}
        for n in budgets:
            cands = {k: correct[k][n] for k in names if n in correct[k]}
            chosen, right = analysis.compute_optimal(cands, bb, select)
            per_n[kind][n] = {"chosen": chosen, "accuracy": _mean(right[ev]), "bon": _mean(correct[ref_name][n][ev])}
            if ref_name not in flops or n not in flops[ref_name]:
                continue
            budget = flops[ref_name][n]
            chosen, right = analysis.compute_optimal_at_flops(configs, config_flops, budget, bb, select)
            row = {"flops": budget, "chosen": chosen, "accuracy": _mean(right[ev]), "accuracy_se": _se(right[ev])}
            for ref in REFERENCES:
                if ref in correct:
                    row[ref], row[f"{ref}_se"] = _mean(correct[ref][n][ev]), _se(correct[ref][n][ev])
                    # Paired with the optimal choice on the same problems: the difference's own standard error.
                    row[f"minus_{ref}"] = [_mean(right[ev] - correct[ref][n][ev]), _se(right[ev] - correct[ref][n][ev])]
                    curve = {flops[ref][k]: _mean(correct[ref][k][ev]) for k in correct[ref]}
                    row[f"{ref}_flops_to_match"] = analysis.flops_to_match(row["accuracy"], curve)
            at_flops[kind][n] = row
    return per_n, at_flops
