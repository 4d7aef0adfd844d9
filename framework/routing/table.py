"""The cached outcome table of a routing study: for every (query, model), correct or not, tokens, FLOPs, confidence.

Glossary: Q queries, M models (cheapest first), F query features, K self-consistency samples.

`build_table(models, problems)` runs one batched greedy `generate` pass per model over every query (in chunks of
`batch_size` rows), grades each completion exactly with `arithmetic.check_solution`, prices it with `lm.flops`
(prompt + generated tokens) and records the confidence signals a cascade can use: the mean token log-prob of the
greedy answer and, with `samples=K`, the share of K sampled answers that agree with it (whose K generations are
priced too). Routers and cascades are then evaluated offline on the table, without generating again.

`Model(name, params, cfg)` is a Lumen LM with a name; `Queries` is what a router sees of a batch of queries: the
prompt texts, their features (`query_features`), a deterministic tie-break per prompt, and, for queries of a table,
their row indices (only the oracle reads them).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from framework import inference
from framework.models import lm
from framework.tasks import arithmetic, data
from framework.tasks import tokenizer as tok

FEATURES = ("num_steps", "plus", "minus", "times", "prompt_chars", "answer_mod")


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A named Lumen LM: its params and `LMConfig`."""

    name: str
    params: Any
    cfg: lm.LMConfig


def arith_prompt_body(prompt: str) -> str:
    """The expression of an arithmetic prompt ("Q 3+4*7\\n" -> "3+4*7"): the text the features are read from."""
    body = prompt.strip()
    return body[2:] if body.startswith("Q ") else body


def query_features(prompts: Sequence[str]) -> np.ndarray:
    """[Q, F] float features of arithmetic prompts (`FEATURES`): step count, op counts, length, answer-mod flag.

    Any text is accepted (a prompt that is not an arithmetic question simply counts its characters), so routers built
    on these features can serve raw completions.
    """
    out = np.zeros((len(prompts), len(FEATURES)), np.float64)
    for i, p in enumerate(prompts):
        body = arith_prompt_body(p)
        expr, _, mod = body.partition("%")
        ops = [expr.count(c) for c in "+-*"]
        out[i] = (sum(ops), *ops, len(body), 1.0 if mod else 0.0)
    return out


def tiebreak(prompts: Sequence[str]) -> np.ndarray:
    """[Q] values in [0, 1) fixed by each prompt's text: the order among queries a router scores equally."""
    return np.asarray([zlib.crc32(p.encode()) / 2**32 for p in prompts], np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Queries:
    """A batch of queries as a router sees them (see the module docstring)."""

    prompts: tuple[str, ...]
    features: np.ndarray  # [Q, F]
    tiebreak: np.ndarray  # [Q]
    index: np.ndarray | None = None  # [Q] rows of an OutcomeTable, when the queries come from one

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], index=None) -> Queries:
        """Queries of raw prompt texts (features and tie-breaks computed here)."""
        prompts = tuple(prompts)
        idx = None if index is None else np.asarray(index, np.int64)
        return cls(prompts, query_features(prompts), tiebreak(prompts), idx)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclasses.dataclass(frozen=True, eq=False)
class OutcomeTable:
    """Per (query, model) outcomes; models ordered cheapest first (by mean FLOPs)."""

    names: tuple[str, ...]  # [M]
    prompts: tuple[str, ...]  # [Q]
    difficulty: np.ndarray  # [Q] number of steps K
    correct: np.ndarray  # [Q, M] bool: the stated answer is right
    prompt_tokens: np.ndarray  # [Q] BOS + prompt
    new_tokens: np.ndarray  # [Q, M] generated tokens, the stop token included
    flops: np.ndarray  # [Q, M] lm.flops of the greedy answer
    confidence: dict[str, np.ndarray]  # name -> [Q, M] in [0, 1]: "logprob" (exp mean log-prob), "consistency"
    confidence_flops: dict[str, np.ndarray]  # name -> [Q, M] extra FLOPs the signal costs (0 for "logprob")

    def __post_init__(self):
        Q, M = len(self.prompts), len(self.names)
        for name in ("correct", "new_tokens", "flops"):
            if np.shape(getattr(self, name)) != (Q, M):
                raise ValueError(f"OutcomeTable.{name} has shape {np.shape(getattr(self, name))}, expected {(Q, M)}")
        for name, v in list(self.confidence.items()) + list(self.confidence_flops.items()):
            if np.shape(v) != (Q, M):
                raise ValueError(f"OutcomeTable confidence {name!r} has shape {np.shape(v)}, expected {(Q, M)}")
        mean = self.flops.mean(axis=0)
        if np.any(np.diff(mean) < 0):
            raise ValueError(f"OutcomeTable: models must be ordered cheapest first, mean FLOPs {mean.tolist()}")

    @property
    def num_queries(self) -> int:
        return len(self.prompts)

    @property
    def num_models(self) -> int:
        return len(self.names)

    def queries(self, index=None) -> Queries:
        """The `Queries` of rows `index` (default: all)."""
        idx = np.arange(self.num_queries) if index is None else np.asarray(index, np.int64)
        return Queries.from_prompts([self.prompts[i] for i in idx], idx)

    def subset(self, index) -> OutcomeTable:
        """The table restricted to rows `index`."""
        idx = np.asarray(index, np.int64)
        return OutcomeTable(
            self.names,
            tuple(self.prompts[i] for i in idx),
            self.difficulty[idx],
            self.correct[idx],
            self.prompt_tokens[idx],
            self.new_tokens[idx],
            self.flops[idx],
            {k: v[idx] for k, v in self.confidence.items()},
            {k: v[idx] for k, v in self.confidence_flops.items()},
        )

    def select_models(self, columns) -> OutcomeTable:
        """The table restricted to the models at `columns` (kept in cost order), e.g. a two-stage cascade's."""
        cols = np.asarray(columns, np.int64)
        return OutcomeTable(
            tuple(self.names[c] for c in cols),
            self.prompts,
            self.difficulty,
            self.correct[:, cols],
            self.prompt_tokens,
            self.new_tokens[:, cols],
            self.flops[:, cols],
            {k: v[:, cols] for k, v in self.confidence.items()},
            {k: v[:, cols] for k, v in self.confidence_flops.items()},
        )

    def save(self, path: str) -> None:
        """Writes the table as one .npz file (no pickles)."""
        arrays = dict(
            names=np.asarray(self.names),
            prompts=np.asarray(self.prompts),
            difficulty=self.difficulty,
            correct=self.correct,
            prompt_tokens=self.prompt_tokens,
            new_tokens=self.new_tokens,
            flops=self.flops,
        )
        arrays |= {f"confidence.{k}": v for k, v in self.confidence.items()}
        arrays |= {f"confidence_flops.{k}": v for k, v in self.confidence_flops.items()}
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str) -> OutcomeTable:
        """Reads a table written by `save`."""
        with np.load(path, allow_pickle=False) as f:
            conf = {k.split(".", 1)[1]: f[k] for k in f.files if k.startswith("confidence.")}
            cflops = {k.split(".", 1)[1]: f[k] for k in f.files if k.startswith("confidence_flops.")}
            return cls(
                tuple(str(x) for x in f["names"]),
                tuple(str(x) for x in f["prompts"]),
                f["difficulty"],
                f["correct"],
                f["prompt_tokens"],
                f["new_tokens"],
                f["flops"],
                conf,
                cflops,
            )


def _answers(problems, texts) -> list[int | None]:
    return [arithmetic.check_solution(p, t).answer for p, t in zip(problems, texts)]


def _pad_batch(prompts: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Pads a chunk to `batch_size` rows (copies of its first prompt) so every chunk shares one compile."""
    return prompts + [prompts[0]] * (batch_size - len(prompts))


def run_model(
    model: Model,
    problems: Sequence[arithmetic.Problem],
    *,
    batch_size: int = 128,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One batched pass of `model` over the problems: (completions, new tokens [Q], mean token log-prob [Q])."""
    max_new = max(arithmetic.solution_length(p.num_steps, p.modulus) for p in problems) + 1
    texts, lengths, mean_lp = [], [], []
    for lo in range(0, len(problems), batch_size):
        chunk = [data.encode_prompt(p) for p in problems[lo : lo + batch_size]]
        n = len(chunk)
        key = None if rng is None else jax.random.fold_in(rng, lo)
        out = inference.generate(
            model.params,
            model.cfg,
            _pad_batch(chunk, min(batch_size, len(problems))),
            max_new_tokens=max_new,
            temperature=temperature,
            rng=key,
        )
        toks, lens, lp = (np.asarray(x)[:n] for x in (out.tokens, out.lengths, out.logprobs))
        texts += [tok.decode(toks[i, : lens[i]]) for i in range(n)]
        lengths.append(lens)
        mean_lp.append(lp.sum(axis=1) / np.maximum(lens, 1))
    return texts, np.concatenate(lengths).astype(np.int64), np.concatenate(mean_lp)


def build_table(
    models: Sequence[Model],
    problems: Sequence[arithmetic.Problem],
    *,
    batch_size: int = 128,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
) -> OutcomeTable:
    """Runs every model once over the problems (greedy) and grades them; `samples=K` adds self-consistency.

    Models must be given cheapest first. With K > 0 each model also samples K answers per query at `temperature`
    (per-row keys from `seed`); "consistency" is the share of them equal to the greedy answer and its cost the K
    generations' FLOPs.
    """
    if not models:
        raise ValueError("build_table: no models")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"build_table: samples must be an int >= 0, got {samples!r}")
    Q, M = len(problems), len(models)
    prompt_tokens = np.asarray([len(data.encode_prompt(p)) for p in problems], np.int64)
    correct = np.zeros((Q, M), bool)
    new_tokens = np.zeros((Q, M), np.int64)
    flops = np.zeros((Q, M))
    conf = {"logprob": np.zeros((Q, M))}
    cflops = {"logprob": np.zeros((Q, M))}
    if samples:
        conf["consistency"], cflops["consistency"] = np.zeros((Q, M)), np.zeros((Q, M))
    for m, model in enumerate(models):
        texts, n_new, mean_lp = run_model(model, problems, batch_size=batch_size)
        answers = _answers(problems, texts)
        correct[:, m] = [a is not None and a == p.answer for a, p in zip(answers, problems)]
        new_tokens[:, m] = n_new
        flops[:, m] = lm.flops(model.cfg, prompt_tokens, n_new)
        conf["logprob"][:, m] = np.exp(mean_lp)
        if samples:
            rep = [p for p in problems for _ in range(samples)]
            key = jax.random.fold_in(jax.random.key(seed), m)
            s_texts, s_new, _ = run_model(model, rep, batch_size=batch_size, temperature=temperature, rng=key)
            s_ans = np.asarray([-1 if a is None else a for a in _answers(rep, s_texts)]).reshape(Q, samples)
            greedy = np.asarray([-2 if a is None else a for a in answers])
            conf["consistency"][:, m] = (s_ans == greedy[:, None]).mean(axis=1)
            cflops["consistency"][:, m] = (
                lm.flops(model.cfg, np.repeat(prompt_tokens, samples), s_new).reshape(Q, samples).sum(axis=1)
            )
    return OutcomeTable(
        tuple(m.name for m in models),
        tuple(arithmetic.format_prompt(p) for p in problems),
        np.asarray([p.num_steps for p in problems], np.int64),
        correct,
        prompt_tokens,
        new_tokens,
        flops,
        conf,
        cflops,
    )
