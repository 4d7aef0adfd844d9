"""Exact-match evaluation of an LM policy on the arithmetic task, by number of steps K.

Greedy decoding by default: each held-out problem's prompt is completed with `framework.inference.generate` and the
text is graded by `check_solution`. Reported per K: exact-match accuracy (right answer and every step on the gold
path), answer accuracy, per-step accuracy (fraction of locally correct steps) and the first-error rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from framework import inference
from framework.tasks import arithmetic, data
from framework.tasks import tokenizer as tok


def eval_problems(seed: int, k: int, n: int, **knobs) -> list[arithmetic.Problem]:
    """The held-out (split "test") problems with exactly K = k steps used to score a policy."""
    knobs = {key: v for key, v in knobs.items() if key != "num_steps"}
    stream = data.split_seed(seed, "test")
    return arithmetic.sample_problems(np.random.default_rng([stream, k]), n, num_steps=k, **knobs)


def complete(
    params,
    cfg,
    problems: list[arithmetic.Problem],
    *,
    batch_size: int = 128,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
) -> list[str]:
    """Completions (decoded text after the prompt) of `problems` under the policy."""
    texts = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [data.encode_prompt(p) for p in chunk]
        max_new = max(arithmetic.solution_length(p.num_steps, p.modulus) for p in chunk) + 1
        key = None if rng is None else jax.random.fold_in(rng, start)
        out = inference.generate(params, cfg, prompts, max_new_tokens=max_new, temperature=temperature, rng=key)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        texts += [tok.decode(tokens[i, : lengths[i]]) for i in range(len(chunk))]
    return texts


def grade(problems: Iterable[arithmetic.Problem], texts: Iterable[str]) -> dict[str, float]:
    """Aggregate verdicts of `check_solution` over (problem, completion) pairs."""
    results = [arithmetic.check_solution(p, t) for p, t in zip(problems, texts)]
    steps = sum(len(r.step_ok) for r in results)
    return {
        "exact_match": float(np.mean([r.answer_correct and r.process_correct for r in results])),
        "answer_accuracy": float(np.mean([r.answer_correct for r in results])),
        "step_accuracy": sum(sum(r.step_ok) for r in results) / max(steps, 1),
        "first_step_error_rate": float(np.mean([r.first_error == 0 for r in results])),
        "n": len(results),
    }


def accuracy_by_k(
    params, cfg, *, seed: int, ks: Iterable[int], problems_per_k: int, knobs: Mapping[str, Any], batch_size: int = 128
) -> dict[int, dict[str, float]]:
    """Greedy exact-match (and step) accuracy for each K on held-out problems."""
    out = {}
    for k in ks:
        problems = eval_problems(seed, k, problems_per_k, **knobs)
        out[int(k)] = grade(problems, complete(params, cfg, problems, batch_size=batch_size))
    return out
