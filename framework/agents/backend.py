"""Agents and the backends that answer a round of requests: Lumen LMs batched into one `generate`, or scripts.

Glossary: B rows of a round (agents x problems), T padded prompt tokens, N new tokens.

An `Agent` is a Lumen LM (params + `LMConfig` with the "text" tokenizer) with its sampling parameters. The runner
hands a backend one phase at a time: every `Request` of the phase (one per agent and problem). `LMBackend` answers
all rows whose agents share a model and sampling parameters with ONE `inference.generate` call (rows = agents x
problems); agents of a run normally share both, so a round is one call. Row b samples with its own key,
`fold_in(fold_in(fold_in(key(seed), crc32(phase)), agent), problem)`, so its text depends on who wrote it where,
never on the batch it ran in: rerunning a phase (resume, replay) gives the same texts.

Costs: every reply carries its prompt tokens (BOS included), new tokens and `lm.flops(cfg, prompt, new)`.
`ScriptedBackend` answers from a function of the request (fixed outputs for tests), counting tokens as characters
and FLOPs as zero; both count their `calls`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from framework import inference
from framework.models import lm
from framework.tasks import tokenizer as tok_lib


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling parameters of an agent: temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"Sampling.temperature = {self.temperature!r}; expected a finite value >= 0")


@dataclasses.dataclass(eq=False)
class Agent:
    """A Lumen LM with its sampling parameters; `name` labels its messages."""

    params: Any
    cfg: lm.LMConfig
    sampling: Sampling = Sampling()
    name: str = "agent"


@dataclasses.dataclass(frozen=True)
class Request:
    """One row of a phase: which agent, which problem, the role, the prompt text and its token budget."""

    agent: int
    task: int
    role: str
    prompt: str
    max_new_tokens: int

    @property
    def message_id(self) -> str:
        """Unique within a phase."""
        return f"a{self.agent}/p{self.task}"


@dataclasses.dataclass(frozen=True)
class Reply:
    """What an agent wrote for a request, its costs, and a failure name when it did not answer."""

    text: str
    prompt_tokens: int
    new_tokens: int
    flops: float
    failure: str | None = None


class ScriptedBackend:
    """Answers each request with `script(phase, request) -> text` (fixed outputs); counts calls per phase."""

    def __init__(self, script: Callable[[str, Request], str], *, max_context: int = 1 << 30):
        self.script, self.max_context = script, max_context
        self.calls: list[str] = []

    def prompt_tokens(self, request: Request) -> int:
        """Characters plus BOS, as the text tokenizer counts them."""
        return len(request.prompt) + 1

    def __call__(self, phase: str, requests: Sequence[Request]) -> list[Reply]:
        self.calls.append(phase)
        out = []
        for r in requests:
            text = self.script(phase, r)
            out.append(Reply(text, self.prompt_tokens(r), len(text), 0.0))
        return out


@jax.jit
def _keys(base, agents_B, tasks_B):
    return jax.vmap(lambda a, t: jax.random.fold_in(jax.random.fold_in(base, a), t))(agents_B, tasks_B)


def row_keys(seed: int, phase: str, agents_B, tasks_B) -> jax.Array:
    """The sampling keys of rows: row b's is a function of (seed, phase, agents_B[b], tasks_B[b]) only."""
    base = jax.random.fold_in(jax.random.key(seed), zlib.crc32(phase.encode()) & 0x7FFFFFFF)
    return _keys(base, np.asarray(agents_B, np.int32), np.asarray(tasks_B, np.int32))


class LMBackend:
    """Answers a phase with one batched `generate` per group of agents sharing (params, cfg, sampling)."""

    def __init__(self, agents: Sequence[Agent], *, seed: int = 0):
        if not agents:
            raise ValueError("LMBackend: agents is empty; expected at least one Agent")
        for i, a in enumerate(agents):
            tok = tok_lib.tokenizer_for(a.cfg)
            if tok.name != "text":
                raise ValueError(f"agent {i} ({a.name}): model.tokenizer = {a.cfg.tokenizer!r}; agents read 'text'")
        self.agents, self.seed = list(agents), seed
        self.tokenizer = tok_lib.get_tokenizer("text")
        # one id per character: prompts are encoded in one call and texts decoded by table lookup
        self._chars = np.asarray([""] * tok_lib.NUM_SPECIAL + list(tok_lib.TEXT_ALPHABET), dtype=object)
        self.max_context = min(a.cfg.max_seq_len for a in agents)
        self.calls: list[str] = []

    def prompt_tokens(self, request: Request) -> int:
        """BOS + the prompt's characters."""
        return len(request.prompt) + 1

    def _encode(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """[BOS] + ids of each prompt (one tokenizer call for the whole round)."""
        ids = self.tokenizer.encode("".join(prompts))
        cuts = np.cumsum([len(p) for p in prompts])[:-1]
        bos = np.asarray([self.tokenizer.bos_id], np.int32)
        return [np.concatenate([bos, x]) for x in np.split(ids, cuts)]

    def _group_key(self, agent: int):
        a = self.agents[agent]
        return (id(a.params), a.cfg, a.sampling)

    def __call__(self, phase: str, requests: Sequence[Request]) -> list[Reply]:
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            if not 0 <= r.agent < len(self.agents):
                raise ValueError(f"request agent = {r.agent}; the backend has {len(self.agents)} agents")
            groups.setdefault(self._group_key(r.agent), []).append(i)
        replies: list[Reply | None] = [None] * len(requests)
        for rows in groups.values():
            agent = self.agents[requests[rows[0]].agent]
            rows_req = [requests[i] for i in rows]
            prompts = self._encode([r.prompt for r in rows_req])
            max_new = max(r.max_new_tokens for r in rows_req)
            s = agent.sampling
            keys = None
            if s.temperature > 0:
                keys = row_keys(self.seed, phase, [r.agent for r in rows_req], [r.task for r in rows_req])
            self.calls.append(phase)
            out = inference.generate(
                agent.params,
                agent.cfg,
                prompts,
                max_new_tokens=max_new,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                rng=keys,
            )
            tokens_BN, lengths_B = np.asarray(out.tokens), np.asarray(out.lengths)
            prompt_B = np.asarray([len(p) for p in prompts])
            flops_B = lm.flops(agent.cfg, prompt_B, lengths_B)
            for j, i in enumerate(rows):
                n = min(int(lengths_B[j]), rows_req[j].max_new_tokens)  # a row's own budget caps its text
                text = "".join(self._chars[tokens_BN[j, :n]])
                replies[i] = Reply(text, int(prompt_B[j]), int(lengths_B[j]), float(flops_B[j]))
        return replies
