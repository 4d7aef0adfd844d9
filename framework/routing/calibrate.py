"""Offline evaluation of routing decisions on an outcome table, threshold sweeps, and threshold calibration.

Glossary: Q queries, M models (cheapest first), P operating points.

A routing decision is `routers.route(probs, thresholds, tiebreak)`. Its cost per query is the chosen model's FLOPs
on that query (the table's `flops`) plus the router's own (`Router.flops`); its accuracy the chosen model's
`correct`. Calibration needs no labels, only the router's probabilities on a calibration set:
  `calibrate_shares(probs, tiebreak, shares)`   per-model thresholds so that model m gets `shares[m]` of the calls:
      model 0 takes the share[0]·Q queries it scores highest, model 1 the share[1]·Q highest of the rest, and so on;
      the last model takes what is left. Exact up to one query per model (ties are split by the tie-break).
  `calibrate_budget(probs, tiebreak, cost, budget)`   the largest scalar threshold whose mean cost is <= budget
      (a higher threshold sends traffic to dearer models, so the mean cost rises with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from framework.routing import metrics
from framework.routing.routers import Router, route, scores
from framework.routing.table import OutcomeTable, Queries


class RoutingResult(NamedTuple):
    """Per-query outcome of one routing decision over table rows."""

    choice: np.ndarray  # [Q] model index
    cost: np.ndarray  # [Q] FLOPs: the chosen model's + the router's
    correct: np.ndarray  # [Q] bool

    @property
    def point(self) -> metrics.Point:
        """(mean cost, accuracy)."""
        return metrics.Point(float(self.cost.mean()), float(self.correct.mean()))

    def shares(self, num_models: int) -> np.ndarray:
        """[M] fraction of queries sent to each model."""
        return np.bincount(self.choice, minlength=num_models) / len(self.choice)


def evaluate(table: OutcomeTable, index, probs_QM, tiebreak_Q, thresholds, router_flops_Q=0.0) -> RoutingResult:
    """Routes table rows `index` with the given probabilities and thresholds; cost and correctness per query."""
    idx = np.asarray(index, np.int64)
    choice = route(probs_QM, thresholds, tiebreak_Q)
    cost = table.flops[idx, choice] + np.broadcast_to(np.asarray(router_flops_Q, np.float64), (len(idx),))
    return RoutingResult(choice, cost, table.correct[idx, choice])


def default_thresholds(probs_QM, tiebreak_Q, num: int = 41) -> np.ndarray:
    """Scalar thresholds spanning every decision: `num` quantiles of the scores, a uniform grid on [0, 1] (which
    splits scores that take few values), all-cheapest (-inf) and all-dearest (inf)."""
    s = scores(probs_QM, tiebreak_Q)[:, :-1].ravel()
    qs = np.quantile(s, np.linspace(0, 1, num - 2)) if s.size else np.zeros(0)
    return np.unique(np.concatenate([[-np.inf], qs, np.linspace(0, 1, 21), [np.inf]]))


def sweep(router: Router, table: OutcomeTable, index, thresholds=None) -> tuple[np.ndarray, list[RoutingResult]]:
    """(thresholds [P], results): the router's operating points over table rows `index`."""
    q = table.queries(index)
    probs, rf = router.predict(q), router.flops(q)
    taus = default_thresholds(probs, q.tiebreak) if thresholds is None else np.asarray(thresholds, np.float64)
    return taus, [evaluate(table, q.index, probs, q.tiebreak, t, rf) for t in taus]


def sweep_utility(router: Router, table: OutcomeTable, index, prices=None, cost_M=None):
    """(prices [P], results): operating points of the expected-utility rule (`routers.route_utility`).

    `cost_M` is each model's mean FLOPs per query (default: over the table's rows `index`).
    """
    from framework.routing.routers import route_utility

    q = table.queries(index)
    probs, rf = router.predict(q), router.flops(q)
    c = table.flops[q.index].mean(axis=0) if cost_M is None else np.asarray(cost_M, np.float64)
    prices = np.concatenate([[0.0], np.geomspace(1e-3, 1e2, 48)]) if prices is None else np.asarray(prices)
    out = []
    for price in prices:
        choice = route_utility(probs, c, price)
        cost = table.flops[q.index, choice] + np.broadcast_to(np.asarray(rf, np.float64), (len(q),))
        out.append(RoutingResult(choice, cost, table.correct[q.index, choice]))
    return prices, out


def model_points(table: OutcomeTable, index=None) -> list[metrics.Point]:
    """[M] (mean cost, accuracy) of each model answering every query of rows `index` alone."""
    idx = np.arange(table.num_queries) if index is None else np.asarray(index, np.int64)
    return [
        metrics.Point(float(table.flops[idx, m].mean()), float(table.correct[idx, m].mean()))
        for m in range(table.num_models)
    ]


def _split_top(s: np.ndarray, n: int) -> float:
    """A threshold passing exactly the n highest of s (midpoint between the n-th and (n+1)-th)."""
    if n <= 0:
        return float(s.max()) + 1.0 if s.size else np.inf
    if n >= s.size:
        return -np.inf
    top = np.sort(s)[::-1]
    return float(0.5 * (top[n - 1] + top[n]))


def sequential_thresholds(scores_QM: np.ndarray, shares: Sequence[float]) -> np.ndarray:
    """[M] thresholds giving stage m the share[m] of all queries among those no earlier stage took (last: the rest)."""
    s = np.asarray(scores_QM, np.float64)
    sh = np.asarray(shares, np.float64)
    Q, M = s.shape
    if sh.shape != (M,) or np.any(sh < 0) or not np.isclose(sh.sum(), 1.0, atol=1e-6):
        raise ValueError(f"shares must be {M} non-negative numbers summing to 1, got {list(shares)}")
    taus = np.full(M, -np.inf)
    left = np.ones(Q, bool)
    targets = np.round(np.cumsum(sh) * Q).astype(np.int64)
    taken = 0
    for m in range(M - 1):
        n = int(targets[m] - taken)
        taus[m] = _split_top(s[left, m], n)
        passed = left & (s[:, m] >= taus[m])
        taken += int(passed.sum())
        left &= ~passed
    return taus


def calibrate_shares(probs_QM, tiebreak_Q, shares: Sequence[float]) -> np.ndarray:
    """[M] per-model thresholds that send `shares[m]` of the calibration queries to model m (see module docstring)."""
    return sequential_thresholds(scores(probs_QM, tiebreak_Q), shares)


def calibrate_budget(probs_QM, tiebreak_Q, cost_QM, budget: float, router_flops_Q=0.0) -> float:
    """The largest scalar threshold whose mean FLOPs per query (router included) stays <= `budget`.

    Raises ValueError when even routing every query to its cheapest option exceeds the budget.
    """
    p = np.asarray(probs_QM, np.float64)
    cost = np.asarray(cost_QM, np.float64)
    rf = np.broadcast_to(np.asarray(router_flops_Q, np.float64), (len(p),))

    def mean_cost(t):
        return float((cost[np.arange(len(p)), route(p, t, tiebreak_Q)] + rf).mean())

    cands = np.unique(np.concatenate([[-np.inf], scores(p, tiebreak_Q)[:, :-1].ravel(), [np.inf]]))
    if mean_cost(cands[0]) > budget:
        raise ValueError(
            f"calibrate_budget: budget {budget:.4g} FLOPs is below the cheapest routing "
            f"({mean_cost(cands[0]):.4g} FLOPs per query)"
        )
    lo, hi = 0, len(cands) - 1  # invariant: cands[lo] fits the budget
    if mean_cost(cands[hi]) <= budget:
        return float(cands[hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mean_cost(cands[mid]) <= budget else (lo, mid)
    return float(cands[lo])


def calibrate_router_shares(router: Router, queries: Queries, shares: Sequence[float]) -> np.ndarray:
    """`calibrate_shares` on a router's predictions for unlabeled calibration queries."""
    return calibrate_shares(router.predict(queries), queries.tiebreak, shares)
