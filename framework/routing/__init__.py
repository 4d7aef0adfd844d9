"""Routing and cascades over several Lumen models: routers, cascades, the FLOPs cost model, calibration, metrics.

Glossary: Q queries, M models (cheapest first), P operating points.

from framework.routing import table, routers, calibrate, cascade, metrics
t = table.build_table([small, medium, large], problems)        # one batched generate pass per model, exact labels
r = routers.MFRouter.fit(t, train_idx)                          # or KNN, HiddenState, Difficulty, Random, Oracle
taus, results = calibrate.sweep(r, t, test_idx)                 # operating points (mean FLOPs, accuracy)
weak, *_, strong = calibrate.model_points(t, test_idx)
metrics.summary([res.point for res in results], weak, strong)   # AUC, APGR, CPT(50/80), AIQ
tau = calibrate.calibrate_shares(r.predict(q), q.tiebreak, [0.8, 0.1, 0.1])   # 80% of calls to the smallest
cascade.calibrate_cascade(t, cal_idx, [0.6, 0.3, 0.1]).evaluate(t, test_idx)

Every cost is `lm.flops` of the tokens each model reads and writes, plus the router's or the confidence signal's own.
"""

from framework.routing import calibrate, cascade, metrics, routers, table
from framework.routing.cascade import Cascade, SelfConsistency, VerifierConfidence, mean_logprob_confidence
from framework.routing.routers import (
    DifficultyRouter,
    HiddenStateRouter,
    KNNRouter,
    MFRouter,
    OracleRouter,
    RandomRouter,
    Router,
    route,
    route_utility,
)
from framework.routing.table import Model, OutcomeTable, Queries, build_table

__all__ = [
    "Cascade",
    "DifficultyRouter",
    "HiddenStateRouter",
    "KNNRouter",
    "MFRouter",
    "Model",
    "OracleRouter",
    "OutcomeTable",
    "Queries",
    "RandomRouter",
    "Router",
    "SelfConsistency",
    "VerifierConfidence",
    "build_table",
    "calibrate",
    "cascade",
    "mean_logprob_confidence",
    "metrics",
    "route",
    "route_utility",
    "routers",
    "table",
]
