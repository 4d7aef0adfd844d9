"""Cascades: try the models cheapest first and stop at the first whose confidence reaches its threshold.

Glossary: Q queries, M models (cheapest first), B rows of one stage's generate call, K samples.

Stage m answers every query still open; a query stops there when its confidence c[q, m] >= tau[m]; the last stage
answers whatever is left. A query's cost is the sum, over the stages it went through, of the model's FLOPs on it
and the confidence signal's own FLOPs (samples, a verifier's pass). A query answered with confidence >= tau at a
stage is never sent to a dearer model: that is the cascade's contract, checked in the tests.

Confidence signals (each a `fn(model, prompts_B, out) -> (confidence_B in [0, 1], extra FLOPs_B)`):
  `mean_logprob_confidence`  exp(mean token log-prob) of the greedy answer under the model itself; free.
  `SelfConsistency(k)`       share of k sampled answers equal to the greedy one; costs the k generations.
  `VerifierConfidence`       a scorer's probability that the answer is right (e.g. an ORM/PRM's last-line score from
                             `framework.verifiers`), priced by its own FLOPs function.

`Cascade.evaluate(table, index)` replays a cascade on an `OutcomeTable`'s cached confidences; `Cascade.run` calls
`generate` stage by stage on real prompts. `calibrate_cascade` sets the thresholds so that a target share of the
queries stops at each stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from framework import inference
from framework.models import lm
from framework.routing import metrics
from framework.routing.calibrate import sequential_thresholds
from framework.routing.routers import TIE_EPS
from framework.routing.table import Model, OutcomeTable
from framework.tasks import tokenizer as tok

ConfidenceFn = Callable[[Model, list, inference.GenerateOutput], tuple[np.ndarray, np.ndarray]]


def mean_logprob_confidence(model: Model, prompts: list, out: inference.GenerateOutput):
    """exp(mean log-prob of the generated tokens) under the model: free, read off the greedy pass."""
    lp, n = np.asarray(out.logprobs), np.asarray(out.lengths)
    return np.exp(lp.sum(axis=1) / np.maximum(n, 1)), np.zeros(len(n))


def final_answer(text: str) -> str | None:
    """The text of the first line starting with "A " (the arithmetic format's answer line), None if absent."""
    for line in text.split("\n"):
        if line.startswith("A "):
            return line[2:].strip()
    return None


@dataclasses.dataclass(frozen=True)
class SelfConsistency:
    """Share of `k` samples (at `temperature`, keys from `seed`) whose answer equals the greedy answer's."""

    k: int = 4
    temperature: float = 1.0
    seed: int = 0
    answer_fn: Callable[[str], object] = final_answer

    def __call__(self, model: Model, prompts: list, out: inference.GenerateOutput):
        B, N = len(prompts), out.tokens.shape[1]
        rep = [p for p in prompts for _ in range(self.k)]
        s = inference.generate(
            model.params, model.cfg, rep, max_new_tokens=N, temperature=self.temperature, rng=jax.random.key(self.seed)
        )
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        greedy = [self.answer_fn(tok.decode(tokens[i, : lengths[i]])) for i in range(B)]
        st, sl = np.asarray(s.tokens), np.asarray(s.lengths)
        sampled = [self.answer_fn(tok.decode(st[i, : sl[i]])) for i in range(len(rep))]
        agree = np.asarray(
            [g is not None and a == g for a, g in zip(sampled, np.repeat(np.asarray(greedy, object), self.k))]
        )
        extra = lm.flops(model.cfg, np.asarray([len(p) for p in rep]), sl).reshape(B, self.k).sum(axis=1)
        return agree.reshape(B, self.k).mean(axis=1), extra


@dataclasses.dataclass(frozen=True)
class VerifierConfidence:
    """A scorer's probability that each answer is right: `score_fn(model, prompts_B, out) -> [B]`, priced by
    `flops_fn(model, prompts_B, out) -> [B]`."""

    score_fn: Callable
    flops_fn: Callable

    def __call__(self, model: Model, prompts: list, out: inference.GenerateOutput):
        return np.asarray(self.score_fn(model, prompts, out), np.float64), np.asarray(
            self.flops_fn(model, prompts, out), np.float64
        )


class CascadeResult(NamedTuple):
    """Per-query trace of a cascade: where it stopped, which models it called, what it cost, whether it was right."""

    stop: np.ndarray  # [Q] index of the answering model
    called: np.ndarray  # [Q, M] bool
    confidence: np.ndarray  # [Q, M] the signal at each stage called (nan where not called)
    cost: np.ndarray  # [Q] FLOPs
    correct: np.ndarray | None  # [Q] bool (None for `run`, which has no labels)

    @property
    def point(self) -> metrics.Point:
        """(mean cost, accuracy); needs labels (`evaluate`)."""
        if self.correct is None:
            raise ValueError("CascadeResult.point: this trace has no labels (Cascade.run); use Cascade.evaluate")
        return metrics.Point(float(self.cost.mean()), float(self.correct.mean()))


def _check_thresholds(thresholds, M: int) -> np.ndarray:
    tau = np.asarray(thresholds, np.float64).reshape(-1)
    if tau.shape == (1,):
        tau = np.full(M, tau[0])
    if tau.shape not in ((M,), (M - 1,)) or np.any(np.isnan(tau)):
        raise ValueError(f"Cascade: thresholds must be one number or one per stage ({M - 1} or {M}), got {tau}")
    return np.append(tau[: M - 1], -np.inf)


@dataclasses.dataclass(frozen=True)
class Cascade:
    """Cheapest-first cascade with per-stage thresholds `thresholds` (the last stage always answers)."""

    thresholds: tuple[float, ...]
    confidence: str = "logprob"  # the OutcomeTable confidence column `evaluate` reads

    def evaluate(self, table: OutcomeTable, index=None) -> CascadeResult:
        """Replays the cascade on the table's cached confidences for rows `index` (default all)."""
        idx = np.arange(table.num_queries) if index is None else np.asarray(index, np.int64)
        if self.confidence not in table.confidence:
            raise ValueError(f"Cascade.confidence = {self.confidence!r}; the table has {sorted(table.confidence)}")
        M = table.num_models
        tau = _check_thresholds(self.thresholds, M)
        conf = table.confidence[self.confidence][idx]
        s = conf + TIE_EPS * table.queries(idx).tiebreak[:, None]
        stop = np.argmax(s >= tau[None, :], axis=1)
        called = np.arange(M)[None, :] <= stop[:, None]
        per_stage = table.flops[idx] + table.confidence_flops[self.confidence][idx]
        cost = (per_stage * called).sum(axis=1)
        return CascadeResult(stop, called, np.where(called, conf, np.nan), cost, table.correct[idx, stop])

    def run(
        self,
        models: Sequence[Model],
        prompts: Sequence[np.ndarray],
        *,
        max_new_tokens: int,
        confidence_fn: ConfidenceFn = mean_logprob_confidence,
        tiebreak=None,
    ) -> tuple[CascadeResult, list]:
        """Runs the cascade with `generate` (greedy) stage by stage; returns (trace, the answering tokens per query).

        Each stage generates only for the queries still open, in one batched call.
        """
        M, Q = len(models), len(prompts)
        tau = _check_thresholds(self.thresholds, M)
        tb = np.zeros(Q) if tiebreak is None else np.asarray(tiebreak, np.float64)
        stop = np.full(Q, -1)
        conf = np.full((Q, M), np.nan)
        cost = np.zeros(Q)
        answers: list = [None] * Q
        lens = np.asarray([len(p) for p in prompts])
        for m, model in enumerate(models):
            rows = np.nonzero(stop < 0)[0]
            if not len(rows):
                break
            batch = [prompts[i] for i in rows]
            out = inference.generate(model.params, model.cfg, batch, max_new_tokens=max_new_tokens)
            c, extra = confidence_fn(model, batch, out)
            n_new = np.asarray(out.lengths)
            cost[rows] += lm.flops(model.cfg, lens[rows], n_new) + extra
            conf[rows, m] = c
            done = (c + TIE_EPS * tb[rows]) >= tau[m]
            tokens = np.asarray(out.tokens)
            for j, i in enumerate(rows):
                if done[j]:
                    stop[i] = m
                    answers[i] = tokens[j, : n_new[j]]
        called = ~np.isnan(conf)
        return CascadeResult(stop, called, conf, cost, None), answers


def calibrate_cascade(table: OutcomeTable, index, shares: Sequence[float], confidence: str = "logprob") -> Cascade:
    """A cascade whose stage m answers `shares[m]` of the queries of rows `index` (needs no labels)."""
    idx = np.asarray(index, np.int64)
    conf = table.confidence[confidence][idx] + TIE_EPS * table.queries(idx).tiebreak[:, None]
    tau = sequential_thresholds(conf, shares)
    return Cascade(tuple(float(t) for t in tau[:-1]), confidence)


def sweep_cascade(table: OutcomeTable, index=None, confidence: str = "logprob", thresholds=None):
    """(thresholds [P], results): a cascade's operating points with one scalar threshold for every stage."""
    idx = np.arange(table.num_queries) if index is None else np.asarray(index, np.int64)
    if thresholds is None:
        c = table.confidence[confidence][idx][:, :-1].ravel()
        thresholds = np.unique(np.concatenate([[-np.inf], np.quantile(c, np.linspace(0, 1, 39)), [np.inf]]))
    taus = np.asarray(thresholds, np.float64)
    return taus, [Cascade((float(t),), confidence).evaluate(table, idx) for t in taus]
