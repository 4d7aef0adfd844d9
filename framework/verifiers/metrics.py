"""ProcessBench-style verifier metrics: earliest-error F1 and step-level AUROC.

ProcessBench (Zheng et al., 2024) asks a verifier for the index of the earliest wrong step of a solution, or "no
error". Accuracy is measured separately on flawed solutions (the predicted index must equal the true one) and on
correct solutions (the prediction must be "no error"); the score is the harmonic mean of the two. A PRM predicts
the earliest error as the first step whose score falls below a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.stats


def predicted_first_error(scores: np.ndarray, threshold: float = 0.5) -> int | None:
    """The first line whose score is below `threshold`, None if none is (the "no error" answer)."""
    bad = np.flatnonzero(np.asarray(scores, np.float64) < threshold)
    return int(bad[0]) if bad.size else None


def earliest_error_f1(predicted: Sequence[int | None], gold: Sequence[int | None]) -> dict[str, float]:
    """ProcessBench F1: harmonic mean of accuracy on flawed (gold not None) and on correct (gold None) solutions.

    Returns {"f1", "acc_flawed", "acc_correct", "n_flawed", "n_correct"}; an accuracy over an empty group is NaN
    and then so is F1.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"earliest_error_f1: {len(predicted)} predictions but {len(gold)} gold indices")
    flawed = [p == g for p, g in zip(predicted, gold) if g is not None]
    correct = [p is None for p, g in zip(predicted, gold) if g is None]
    a = float(np.mean(flawed)) if flawed else float("nan")
    b = float(np.mean(correct)) if correct else float("nan")
    f1 = 0.0 if a + b == 0 else 2 * a * b / (a + b)
    return {"f1": f1, "acc_flawed": a, "acc_correct": b, "n_flawed": len(flawed), "n_correct": len(correct)}


def auroc(scores: Sequence[float], labels: Sequence[float]) -> float:
    """Area under the ROC curve of `scores` separating labels 1 from 0 (ties count half); NaN if a class is absent.

    Computed as the Mann-Whitney U statistic over average ranks.
    """
    s, y = np.asarray(scores, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.size} scores but {y.size} labels")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("auroc: labels must be 0 or 1")
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(s)
    return float((np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def process_metrics(
    scores: Sequence[np.ndarray], gold: Sequence[np.ndarray], *, threshold: float = 0.5
) -> dict[str, float]:
    """Earliest-error F1 (scores vs gold line labels) and step AUROC over every labelled line of every trace.

    Traces without a finished line are left out (there is no step to judge).
    """
    if len(scores) != len(gold):
        raise ValueError(f"process_metrics: {len(scores)} score vectors but {len(gold)} label vectors")
    pred, true, flat_s, flat_y = [], [], [], []
    for t, (s, g) in enumerate(zip(scores, gold)):
        s, g = np.asarray(s, np.float64), np.asarray(g, np.float64)
        if s.shape != g.shape:
            raise ValueError(f"process_metrics: trace {t} has {s.size} scores but {g.size} labels")
        if g.size == 0:  # no finished line: nothing to judge
            continue
        pred.append(predicted_first_error(s, threshold))
        bad = np.flatnonzero(g < 0.5)
        true.append(int(bad[0]) if bad.size else None)
        flat_s.append(s)
        flat_y.append(g)
    out = earliest_error_f1(pred, true)
    if flat_s:
        out["step_auroc"] = auroc(np.concatenate(flat_s), np.concatenate(flat_y) >= 0.5)
    return out
