"""Routing metrics on the cost-accuracy plane: the curve, its AUC, APGR, CPT and AIQ (area under the convex hull).

Glossary: P operating points (one per threshold of a router or cascade), each a (cost, accuracy) pair; costs are mean
FLOPs per query (`lm.flops`, router and verifier costs included). `weak` and `strong` are the (cost, accuracy)
points of the cheapest and the most expensive model answering every query alone.

Conventions, fixed here once for every study:
  curve(c)  the best accuracy a system reaches at mean cost <= c, mixing operating points at random (so linear
            between them) and never worse for spending more: the non-decreasing upper envelope of the points
            interpolated linearly. The weak model alone is always one of the points (any router can be bypassed).
            Below the cheapest point the curve is undefined; the metrics below integrate from the weak model's cost.
  AUC       mean of curve(c) over c in [weak cost, strong cost] (accuracy units).
  APGR      RouteLLM's average performance gap recovered: mean over c in [weak cost, strong cost] of
            PGR(c) = (curve(c) - weak acc) / (strong acc - weak acc). A router that picks the strong model at random
            lies on the line between weak and strong, so its APGR is 0.5 in expectation.
  normalized APGR  the area between the curve and that random line, over the same area for the oracle:
            ∫ (curve - line) / ∫ (oracle curve - line) on [weak cost, strong cost]; 0 in expectation for a random
            router, 1 for the oracle, negative for a router worse than chance.
  CPT(x)    cost-performance threshold: the smallest cost fraction (c - weak cost) / (strong cost - weak cost) at
            which curve(c) >= weak acc + x (strong acc - weak acc); inf if never reached.
  AIQ       RouterBench's average improvement in quality: the mean over [weak cost, strong cost] of the
            non-decreasing upper convex hull of the points (the hull is what mixing thresholds can reach).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

_GRID = 2049  # integration points on [weak cost, strong cost]; the curves are piecewise linear


class Point(NamedTuple):
    """One operating point: mean cost per query (FLOPs) and accuracy."""

    cost: float
    accuracy: float


def _arrays(points: Sequence[Point] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(points, np.float64).reshape(-1, 2)
    if not len(arr):
        raise ValueError("routing metrics: no operating points")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"routing metrics: operating points must be finite, got {arr.tolist()}")
    order = np.lexsort((-arr[:, 1], arr[:, 0]))
    return arr[order, 0], arr[order, 1]


def frontier(points: Sequence[Point] | np.ndarray) -> np.ndarray:
    """The Pareto points [P', 2] (cost ascending, accuracy strictly rising): no other point is cheaper and better."""
    c, a = _arrays(points)
    keep, best = [], -np.inf
    for ci, ai in zip(c, a):
        if ai > best:
            keep.append((ci, ai))
            best = ai
    return np.asarray(keep)


def hull(points: Sequence[Point] | np.ndarray) -> np.ndarray:
    """The non-decreasing upper convex hull [H, 2] of the points (RouterBench): what random mixing can reach."""
    f = frontier(points)
    out: list[np.ndarray] = []
    for p in f:
        while len(out) >= 2:
            (c0, a0), (c1, a1) = out[-2], out[-1]
            # Drop the middle point when it lies on or below the chord from out[-2] to p.
            if (a1 - a0) * (p[0] - c0) <= (p[1] - a0) * (c1 - c0):
                out.pop()
            else:
                break
        out.append(p)
    return np.asarray(out)


def _interp(f: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Piecewise-linear value of a frontier/hull at costs c, flat after its last point, nan before its first."""
    y = np.interp(c, f[:, 0], f[:, 1])
    return np.where(c < f[0, 0] - 1e-9 * max(abs(f[0, 0]), 1.0), np.nan, y)


def _envelope(points, weak: Point) -> np.ndarray:
    """Linear interpolation between the Pareto points (weak included), i.e. the random-mixing curve's lower bound.

    Linear interpolation of the Pareto staircase is what mixing two adjacent thresholds reaches; the upper convex
    hull (`hull`) can be higher. RouteLLM's curves interpolate the router's own points in this way.
    """
    return frontier(np.vstack([np.asarray(points, np.float64).reshape(-1, 2), np.asarray([weak], np.float64)]))


def curve(points, weak: Point, costs: np.ndarray) -> np.ndarray:
    """curve(c) at the given costs (see the module docstring); nan below the cheapest point."""
    return _interp(_envelope(points, weak), np.asarray(costs, np.float64))


def _grid(weak: Point, strong: Point) -> np.ndarray:
    if not strong.cost > weak.cost:
        raise ValueError(f"routing metrics: strong cost {strong.cost} must exceed weak cost {weak.cost}")
    return np.linspace(weak.cost, strong.cost, _GRID)


def auc(points, weak: Point, strong: Point) -> float:
    """Mean accuracy of the curve over [weak cost, strong cost]."""
    g = _grid(weak, strong)
    return float(np.trapezoid(curve(points, weak, g), g) / (g[-1] - g[0]))


def apgr(points, weak: Point, strong: Point) -> float:
    """RouteLLM's APGR: mean performance gap recovered over [weak cost, strong cost] (random: 0.5 in expectation)."""
    if strong.accuracy == weak.accuracy:
        raise ValueError("apgr: the strong and weak models have the same accuracy; the gap is undefined")
    return (auc(points, weak, strong) - weak.accuracy) / (strong.accuracy - weak.accuracy)


def normalized_apgr(points, oracle_points, weak: Point, strong: Point) -> float:
    """Area between the curve and the random line over the oracle's: 0 for random in expectation, 1 for the oracle."""
    g = _grid(weak, strong)
    line = weak.accuracy + (g - weak.cost) / (strong.cost - weak.cost) * (strong.accuracy - weak.accuracy)
    num = np.trapezoid(curve(points, weak, g) - line, g)
    den = np.trapezoid(curve(oracle_points, weak, g) - line, g)
    if den <= 0:
        raise ValueError("normalized_apgr: the oracle does not beat the random line; nothing to normalise by")
    return float(num / den)


def cpt(points, weak: Point, strong: Point, gap_fraction: float) -> float:
    """Smallest cost fraction of [weak, strong] at which the curve recovers `gap_fraction` of the gap (inf: never)."""
    if not 0.0 <= gap_fraction <= 1.0:
        raise ValueError(f"cpt: gap_fraction must be in [0, 1], got {gap_fraction}")
    g = _grid(weak, strong)
    target = weak.accuracy + gap_fraction * (strong.accuracy - weak.accuracy)
    ok = np.nonzero(curve(points, weak, g) >= target - 1e-12)[0]
    return float((g[ok[0]] - weak.cost) / (strong.cost - weak.cost)) if len(ok) else float("inf")


def aiq(points, weak: Point, strong: Point) -> float:
    """RouterBench's AIQ: mean of the non-decreasing upper convex hull over [weak cost, strong cost]."""
    g = _grid(weak, strong)
    pts = np.vstack([np.asarray(points, np.float64).reshape(-1, 2), np.asarray([weak], np.float64)])
    return float(np.trapezoid(_interp(hull(pts), g), g) / (g[-1] - g[0]))


def summary(points, weak: Point, strong: Point, oracle_points=None) -> dict[str, float]:
    """Every metric of one router's operating points as a dict (normalized APGR only with `oracle_points`).

    A metric the models make undefined (APGR and CPT when the weak and strong models are equally accurate) is nan.
    """
    fns = {
        "auc": lambda: auc(points, weak, strong),
        "apgr": lambda: apgr(points, weak, strong),
        "cpt50": lambda: cpt(points, weak, strong, 0.5),
        "cpt80": lambda: cpt(points, weak, strong, 0.8),
        "aiq": lambda: aiq(points, weak, strong),
    }
    if oracle_points is not None:
        fns["normalized_apgr"] = lambda: normalized_apgr(points, oracle_points, weak, strong)
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = float(fn())
        except ValueError:
            out[name] = float("nan")
    return out
