"""Test-time search: majority vote, best-of-N (naive, PRM-weighted), beam search, DVTS, lookahead.

from framework import search, verifiers
policy = search.LMPolicy(policy_params, cfg, temperature=0.8)
scorer = verifiers.Verifier(prm_params, cfg)
res = search.run("beam", policy, scorer, problems, n=16, m=4, seed=0)
res.answers, res.traces, res.accuracy(problems), res.tokens_generated.sum(), res.tokens_scored.sum()
search.diagnostics.search_diagnostics(res, problems)   # chosen trace on the gold path, the run's gold-path ceiling
"""

from framework.search import algorithms, compute_optimal, diagnostics, policy, regimes, sweep, toy
from framework.search.algorithms import (
    AGGREGATIONS,
    SELECTIONS,
    STRATEGIES,
    SearchResults,
    aggregate,
    answer_of,
    run,
    vote,
)
from framework.search.policy import Extension, LMPolicy

__all__ = [
    "AGGREGATIONS",
    "Extension",
    "LMPolicy",
    "SELECTIONS",
    "STRATEGIES",
    "SearchResults",
    "aggregate",
    "algorithms",
    "compute_optimal",
    "diagnostics",
    "answer_of",
    "policy",
    "regimes",
    "run",
    "sweep",
    "toy",
    "vote",
]
