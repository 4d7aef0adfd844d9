"""Verifiers: ORM/PRM value heads on a Lumen LM, step labels (gold, Monte-Carlo, consensus), ProcessBench metrics.

from framework import verifiers
lab = [verifiers.gold_labels(p, c) for p, c in zip(problems, completions)]
v = verifiers.init(policy_params, cfg, jax.random.key(0))
v, hist = verifiers.fit(v, cfg, problems, completions, lab, steps=300)
scores = verifiers.Verifier(v, cfg).score(problems, completions).scores
verifiers.process_metrics(scores, lab)       # {"f1", "acc_flawed", "acc_correct", "step_auroc", ...}
verifiers.OracleVerifier(cfg, noise=0.0)     # checker-exact line scores (a perfect PRM), priced as cfg
"""

from framework.verifiers import labels, metrics, model, oracle, sources, traces
from framework.verifiers.labels import (
    MCLabels,
    consensus_labels,
    first_error,
    gold_labels,
    judge_verdicts,
    monte_carlo_label_sets,
    monte_carlo_labels,
    outcome_label,
    outcome_labels,
)
from framework.verifiers.metrics import auroc, earliest_error_f1, predicted_first_error, process_metrics
from framework.verifiers.model import KINDS, PackedBatch, Scores, Verifier, fit, init, load, pack_rows, save
from framework.verifiers.oracle import OracleVerifier

__all__ = [
    "KINDS",
    "MCLabels",
    "OracleVerifier",
    "PackedBatch",
    "Scores",
    "Verifier",
    "auroc",
    "consensus_labels",
    "earliest_error_f1",
    "first_error",
    "fit",
    "gold_labels",
    "init",
    "judge_verdicts",
    "labels",
    "load",
    "metrics",
    "model",
    "oracle",
    "monte_carlo_label_sets",
    "monte_carlo_labels",
    "outcome_label",
    "outcome_labels",
    "pack_rows",
    "predicted_first_error",
    "process_metrics",
    "save",
    "sources",
    "traces",
]
