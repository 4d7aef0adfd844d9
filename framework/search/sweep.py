"""Budget sweeps of a test-time scaling study: pool strategies by subsampling, re-run-per-N searches, revision.

Glossary: P problems, N budget (samples / beams / chains), M beam width.

Every sweep returns a `Sweep`: for each configuration name (e.g. "weighted_best_of_n", "beam", "beam_m2",
"revision_r4") and budget N, the per-problem correctness [P] averaged over seeds, FLOPs per problem (`lm.flops` of
every policy call and verifier pass), wall seconds, and the diagnostics of `framework.search.diagnostics`: whether the
chosen trace is on the gold path and whether any sample (candidate) was -- the gold-path ceiling of that configuration.
Pool strategies (majority, best-of-N, weighted BoN, pass@N) subsample one pool of max(N) samples per problem
(search-and-learn's protocol); beam, DVTS, lookahead and revision are re-run at each N.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np

from framework.search import algorithms, diagnostics, revision
from framework.tasks import arithmetic

log = logging.getLogger(__name__)
POOL_STRATEGIES = ("majority", "best_of_n", "weighted_best_of_n")
STEPWISE = (("beam", "beam", False), ("dvts", "dvts", False), ("lookahead", "beam", True))  # name, strategy, k > 0


@dataclasses.dataclass
class Sweep:
    """Per configuration name and budget N: correctness [P] (mean over seeds), FLOPs per problem, seconds, and the
    gold-path diagnostics (`on_gold`: chosen trace on the gold path; `gold_ceiling`: some sample on it), all [P]."""

    correct: dict[str, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)
    flops: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    seconds: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    on_gold: dict[str, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)
    gold_ceiling: dict[str, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)

    def add(self, name: str, n: int, correct, flops: float, *, on_gold=None, ceiling=None, seconds=None) -> None:
        """Records one (configuration, N) cell; diagnostics and seconds are optional."""
        self.correct.setdefault(name, {})[n] = np.asarray(correct, np.float64)
        self.flops.setdefault(name, {})[n] = float(flops)
        for store, value in ((self.on_gold, on_gold), (self.gold_ceiling, ceiling)):
            if value is not None:
                store.setdefault(name, {})[n] = np.asarray(value, np.float64)
        if seconds is not None:
            self.seconds.setdefault(name, {})[n] = float(seconds)

    def update(self, other: Sweep) -> Sweep:
        """Adds every cell of `other` (later cells replace earlier ones); returns self."""
        for f in dataclasses.fields(self):
            mine = getattr(self, f.name)
            for name, d in getattr(other, f.name).items():
                mine.setdefault(name, {}).update(d)
        return self


def pool_sweep(
    answers: Sequence[Sequence[int | None]],
    line_scores: Sequence[Sequence[np.ndarray]],
    on_gold: Sequence[np.ndarray],
    gold: Sequence[int],
    budgets: Sequence[int],
    seeds: Sequence[int],
    *,
    aggregation: str = "last",
    strategies: Sequence[str] = POOL_STRATEGIES,
    flops_per_sample: float,
    flops_per_score: float,
) -> Sweep:
    """Majority / BoN / weighted BoN / pass@N at each N, subsampled from the pool with rng (seed, N) per seed.

    A pool strategy at N costs N samples at the pool's mean per-sample FLOPs, plus N verifier passes for (w)BoN.
    """
    out = Sweep()
    for n in budgets:
        sub = [
            diagnostics.subsample_pool(
                answers, line_scores, on_gold, gold, n, np.random.default_rng([s, n]), aggregation
            )
            for s in seeds
        ]

        def mean(key, sub=sub):
            return np.mean([x[key] for x in sub], axis=0)

        for name in (*(s for s in POOL_STRATEGIES if s in strategies), "pass_at_n"):
            scored = name in ("best_of_n", "weighted_best_of_n")
            out.add(
                name,
                n,
                mean(name),
                n * (flops_per_sample + (flops_per_score if scored else 0.0)),
                on_gold=mean(f"{name}_on_gold") if scored else None,
                ceiling=mean("gold_pass_at_n"),
            )
    return out


def search_configs(m: int, extra_ms: Sequence[int], strategies: Sequence[str], lookahead: int):
    """(name, `search.run` strategy, M, lookahead k) of every re-run-per-N strategy; widths past the first get
    "_m<M>" names."""
    out = []
    for width in (m, *extra_ms):
        suffix = "" if width == m else f"_m{width}"
        for name, strategy, ahead in STEPWISE:
            if name in strategies:
                out.append((name + suffix, strategy, width, lookahead if ahead else 0))
    return out


def _cell(runs, problems, policy, prm):
    d = [diagnostics.search_diagnostics(r, problems) for r in runs]
    return dict(
        correct=np.mean([x["correct"] for x in d], axis=0),
        flops=float(np.mean([r.flops(policy, prm) for r in runs])) / len(problems),
        on_gold=np.mean([x["chosen_on_gold"] for x in d], axis=0),
        ceiling=np.mean([x["gold_ceiling"] for x in d], axis=0),
    )


def search_sweep(
    policy,
    prm,
    problems: Sequence[arithmetic.Problem],
    budgets: Sequence[int],
    configs: Sequence[tuple[str, str, int, int]],
    seeds: Sequence[int],
    *,
    aggregation: str = "last",
    max_n: int,
    lookahead_max_n: int,
) -> Sweep:
    """Beam / DVTS / lookahead (`search_configs`) re-run at each N that is a multiple of M, up to their caps."""
    out = Sweep()
    for n in budgets:
        for name, strategy, m, k in configs:
            if n < m or n % m or n > (lookahead_max_n if k else max_n):
                continue
            t0 = time.perf_counter()
            runs = [
                algorithms.run(strategy, policy, prm, problems, n=n, m=m, lookahead=k, seed=s, aggregation=aggregation)
                for s in seeds
            ]
            out.add(name, n, **_cell(runs, problems, policy, prm), seconds=time.perf_counter() - t0)
            log.info("%s N=%d: acc %.3f (%.1f s)", name, n, out.correct[name][n].mean(), out.seconds[name][n])
    return out


def revision_sweep(
    policy,
    prm,
    problems: Sequence[arithmetic.Problem],
    budgets: Sequence[int],
    ratios: Sequence[int],
    seeds: Sequence[int],
    *,
    max_n: int,
    lines_per_sample: int,
    threshold: float,
    aggregation: str = "last",
) -> Sweep:
    """Sequential revision at N = chains x ratio ("revision_r<ratio>"): N/ratio chains, each with
    (ratio - 1) x lines_per_sample retractions, PRM-triggered below `threshold`."""
    out = Sweep()
    for n in (n for n in budgets if n <= max_n):
        for r in ratios:
            if n % r:
                continue
            t0 = time.perf_counter()
            runs = [
                revision.revise(
                    policy,
                    prm,
                    problems,
                    chains=n // r,
                    revisions=(r - 1) * lines_per_sample,
                    threshold=threshold,
                    seed=s,
                    aggregation=aggregation,
                )
                for s in seeds
            ]
            name = f"revision_r{r}"
            out.add(name, n, **_cell(runs, problems, policy, prm), seconds=time.perf_counter() - t0)
            log.info("%s N=%d: acc %.3f (%.1f s)", name, n, out.correct[name][n].mean(), out.seconds[name][n])
    return out
