"""Sequential revision (serial test-time compute): a verifier flags a step, the policy retracts it and rewrites it.

Format: a line "!" retracts the line before it (the tokenizer reserves "!" for this marker), e.g.

    23+45=68
    68+03=72      <- flagged by the PRM
    !
    68+03=71      <- the policy's rewrite
    71-17=54
    A 54

`resolve` drops retracted lines, giving the trace the checker and the PRM read. The policy learns to rewrite after
a marker from retry data (Physics of LMs 2.2 style): gold traces in which some steps are first written wrong, then
"!", then right; the wrong lines are left out of the loss so the policy learns to correct, not to err
(`retry_example`, `retry_task`).

`revise` runs `chains` independent chains per problem line by line; after each line the scorer reads the resolved
trace, and a line scoring below `threshold` is retracted and rewritten while the chain has revisions left. All
chains of all problems advance together: one policy call and one scorer call per depth, each recorded in the
results (`policy_calls`, `scorer_calls`) so `SearchResults.flops` prices revision as it prices search.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from framework.models import lm
from framework.search.algorithms import SearchResults, aggregate, answer_of, vote
from framework.search.policy import max_lines
from framework.tasks import arithmetic, data
from framework.tasks import tokenizer as tok
from framework.training.loss import next_token_loss
from framework.verifiers import traces

MARKER = "!"


def resolve(completion: str) -> str:
    """The completion with every "!" line and the line it retracts removed (an unfinished last line is kept)."""
    parts = completion.split("\n")
    kept: list[str] = []
    for line in parts[:-1]:
        if line == MARKER:
            if kept:
                kept.pop()
        else:
            kept.append(line)
    return "".join(x + "\n" for x in kept) + parts[-1]


def retry_example(problem: arithmetic.Problem, rng: np.random.Generator, error_rate: float) -> tuple[str, list[bool]]:
    """A gold solution in which each step is first written wrong with probability `error_rate`, then retracted and
    written right; returns (text, per-line in-loss flags: False for the wrong lines)."""
    gold = arithmetic.format_solution(problem).split("\n")[:-1]
    lines, in_loss = [], []
    w, m = problem.width, problem.modulus
    for i, line in enumerate(gold):
        if i < problem.num_steps and rng.random() < error_rate:
            head, value = line.split("=")
            wrong = (int(value) + int(rng.integers(1, m))) % m
            lines += [f"{head}={str(wrong).zfill(w)}", MARKER]
            in_loss += [False, True]
        lines.append(line)
        in_loss.append(True)
    return "".join(x + "\n" for x in lines), in_loss


def encode_retry_example(
    problem: arithmetic.Problem, rng: np.random.Generator, error_rate: float, seq_len: int
) -> dict[str, np.ndarray]:
    """tokens [T] / loss_mask [T] of `[BOS] + prompt + retry solution + [EOS]`; retries are dropped if too long."""
    text, in_loss = retry_example(problem, rng, error_rate)
    prompt = data.encode_prompt(problem)
    if len(prompt) + len(text) + 1 > seq_len:
        text, in_loss = retry_example(problem, rng, 0.0)
    body = tok.encode(text)
    mask = np.concatenate(
        [np.full(len(line) + 1, float(keep), np.float32) for line, keep in zip(text.split("\n")[:-1], in_loss)]
        + [np.ones(1, np.float32)]
    )
    tokens = np.full(seq_len, tok.PAD_ID, np.int32)
    loss_mask = np.zeros(seq_len, np.float32)
    n = len(prompt) + len(body) + 1
    if n > seq_len:
        raise ValueError(f"retry example of {n} tokens exceeds seq_len={seq_len}")
    tokens[:n] = np.concatenate([prompt, body, [tok.EOS_ID]])
    loss_mask[len(prompt) : n] = mask
    return {"tokens": tokens, "loss_mask": loss_mask}


def retry_batch(index: int, *, seed: int, batch_size: int, seq_len: int, error_rate: float, knobs: dict):
    """Batch `index` of the retry stream: a pure function of (seed, index), so resumed training sees the same data."""
    k = arithmetic.make_knobs(**knobs)
    stream = data.split_seed(seed, "train")
    rows = []
    for j in range(batch_size):
        problem = k.problem_at(stream, index * batch_size + j)
        rows.append(encode_retry_example(problem, np.random.default_rng([seed, index, j, 7]), error_rate, seq_len))
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def retry_loss_fn(model_cfg: lm.LMConfig):
    """The next-token loss on `retry_batch` batches (tokens, loss_mask) that trains the revision policy."""

    def loss_fn(params, batch):
        return next_token_loss(lm.apply(params, batch["tokens"], model_cfg), batch["tokens"], batch["loss_mask"])

    return loss_fn


def _chain_uid(problem: arithmetic.Problem) -> int:
    return zlib.crc32(arithmetic.format_prompt(problem).encode())


def revise(
    policy,
    scorer,
    problems: Sequence[arithmetic.Problem],
    *,
    chains: int,
    revisions: int,
    threshold: float = 0.5,
    seed: int = 0,
    aggregation: str = "last",
    slack_lines: int = 2,
) -> SearchResults:
    """`chains` chains per problem, each allowed `revisions` retractions in total; PRM-weighted vote over chains."""
    for name, v, lo in (("chains", chains, 1), ("revisions", revisions, 0), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"revise: {name} must be an int >= {lo}, got {v!r}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"revise: threshold must be in (0, 1), got {threshold}")
    P = len(problems)
    texts = [""] * (P * chains)
    left = np.full(P * chains, revisions)
    done = np.zeros(P * chains, bool)
    pid = np.repeat(np.arange(P), chains)
    gen, prompt_tok, scored = (np.zeros(P, np.int64) for _ in range(3))
    policy_calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # priced by SearchResults.flops
    scorer_calls: list[tuple[np.ndarray, np.ndarray]] = []
    final_scores: list[np.ndarray] = [np.zeros(0)] * (P * chains)
    cap = [max_lines(p, slack_lines) + revisions * 2 for p in problems]
    depth = 0
    while not done.all():
        rows = np.flatnonzero(~done)
        ps = [problems[pid[i]] for i in rows]
        keys = [(seed, _chain_uid(problems[pid[i]]), depth, 0, int(i % chains)) for i in rows]
        out = policy.extend(ps, [texts[i] for i in rows], until="line", row_keys=keys, call_key=(seed, depth, 5))
        np.add.at(gen, pid[rows], out.tokens)
        np.add.at(prompt_tok, pid[rows], out.prompt_tokens)
        policy_calls.append((pid[rows], np.asarray(out.prompt_tokens), np.asarray(out.tokens)))
        cand = [texts[i] + new for i, new in zip(rows, out.texts)]
        sc = scorer.score(ps, [resolve(c) for c in cand])
        np.add.at(scored, pid[rows], sc.tokens)
        scorer_calls.append((pid[rows], np.asarray(sc.tokens)))
        for i, c, s in zip(rows, cand, sc.scores):
            last = s[-1] if len(s) else 0.0
            finished = traces.is_finished(resolve(c))
            if last < threshold and left[i] > 0 and not finished:
                texts[i] = c + MARKER + "\n"  # retract; the policy rewrites the line at the next depth
                left[i] -= 1
            else:
                texts[i] = c
                final_scores[i] = s
            n_lines = len(traces.split_lines(texts[i]))
            done[i] = traces.is_finished(resolve(texts[i])) or n_lines >= cap[pid[i]]
        depth += 1
    answers, chosen, best_scores, cands, cand_scores = [], [], [], [], []
    for p in range(P):
        idx = range(p * chains, (p + 1) * chains)
        res = [resolve(texts[i]) for i in idx]
        agg = [aggregate(final_scores[i], aggregation) for i in idx]
        ans, j = vote([answer_of(problems[p], r) for r in res], agg)
        answers.append(ans)
        chosen.append(texts[p * chains + j])
        best_scores.append(agg[j] if agg else 0.0)
        cands.append([texts[i] for i in idx])
        cand_scores.append(agg)
    return SearchResults(
        strategy="revision",
        n=chains,
        m=None,
        lookahead=0,
        aggregation=aggregation,
        answers=answers,
        traces=chosen,
        scores=best_scores,
        candidates=cands,
        candidate_scores=cand_scores,
        tokens_generated=gen,
        tokens_prompt=prompt_tok,
        tokens_scored=scored,
        revisions=revisions,
        policy_calls=policy_calls,
        scorer_calls=scorer_calls,
    )
