"""What the OpenAI-compatible server serves: named models, routers over them, request validation and decoding.

Glossary: n choices per prompt, N generated tokens of a row.

Model names: a plain model's name, or a router with its decision rule; the response names the model that answered.
  `router-<router>-<threshold>` (RouteLLM's convention, the threshold rule): the router scores the prompt for every
      model (cheapest first) and the cheapest model whose predicted success is >= threshold answers (the most
      expensive when none is). Any threshold in [0, 1] is accepted.
  `router-<router>-utility-<price>` (the expected-utility rule, `routers.route_utility`): the model maximising
      predicted success - price x its cost / the dearest model's cost, costs being `lm.flops` of this request's
      prompt and `max_tokens` on each model. Any price >= 0 is accepted (0: the most likely model; large: the
      cheapest).
`GET /v1/models` lists the configured thresholds and prices.

Chat: a chat request is mapped to one prompt of the model's format.
  "arith" tokenizer: the last user message is the question. Its text, stripped, gets the task's "Q " prefix if it
      lacks one and a newline, e.g. "3+4*7" -> "Q 3+4*7\\n"; the assistant's reply is the generated solution. Other
      messages are ignored (the arithmetic format has no roles).
  "text" tokenizer: every message becomes a "<role>: <content>\\n" line, then "assistant:" is appended.
  other tokenizers (HF checkpoints): chat is refused (400) until a chat template is wired in.

Every bad request raises `ApiError` (status, message, param, code) before anything reaches `generate`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from framework.models import lm
from framework.routing.routers import Router, route, route_utility
from framework.routing.table import Model, Queries
from framework.serving.batcher import Batcher, Job, Row
from framework.tasks import data
from framework.tasks import tokenizer as tok_lib

ROUTER_NAME = re.compile(r"^router-(?P<name>[A-Za-z0-9_.]+)-(?P<utility>utility-)?(?P<value>[0-9]*\.?[0-9]+)$")
MAX_N = 16


class ApiError(Exception):
    """A request error with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(eq=False)
class ServedRouter:
    """A router over served models (cheapest first) and the thresholds and utility prices `/v1/models` advertises."""

    router: Router
    models: tuple[str, ...]
    thresholds: tuple[float, ...] = (0.5,)
    prices: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a router's predictions pick a model: "threshold" (value in [0, 1]) or "utility" (value = price >= 0)."""

    kind: str
    value: float


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Validated sampling settings of one request."""

    max_tokens: int
    temperature: float
    top_p: float | None
    n: int
    seed: int | None
    stop: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Choice:
    """One generated choice: the model that answered, its text, tokens, log-probs and why it ended."""

    model: str
    text: str
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    prompt_tokens: int


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind} in [{lo}, {hi}], got {v!r}", name, "invalid_value")
    return v


class Engine:
    """Named models and routers, the batcher that runs them, and the request logic of every endpoint."""

    def __init__(
        self,
        models: dict[str, Model],
        routers: dict[str, ServedRouter] | None = None,
        *,
        window_s: float = 0.005,
        max_batch: int = 64,
        min_batch: int = 1,
        max_wait_s: float | None = None,
        default_max_tokens: int = 16,
    ):
        self.models, self.routers = dict(models), dict(routers or {})
        for name, r in self.routers.items():
            missing = [m for m in r.models if m not in self.models]
            if missing or r.router.num_models != len(r.models):
                raise ValueError(
                    f"router {name!r}: models {r.models} must be served and match its "
                    f"{r.router.num_models} outputs (missing: {missing})"
                )
            if not all(0.0 <= t <= 1.0 for t in r.thresholds) or not all(p >= 0.0 for p in r.prices):
                raise ValueError(
                    f"router {name!r}: thresholds must be in [0, 1] and prices >= 0, got {r.thresholds}, {r.prices}"
                )
        self.default_max_tokens = int(default_max_tokens)
        self.batcher = Batcher(
            self.models, window_s=window_s, max_batch=max_batch, min_batch=min_batch, max_wait_s=max_wait_s
        )
        self.tokenizers = {n: tok_lib.get_tokenizer(m.cfg.tokenizer) for n, m in self.models.items()}

    def close(self) -> None:
        """Finishes the submitted work and stops the worker."""
        self.batcher.close()

    def model_names(self) -> list[str]:
        """Every name a request may use: the models, then each router at each advertised threshold."""
        names = list(self.models)
        for rname, r in self.routers.items():
            names += [f"router-{rname}-{t:g}" for t in r.thresholds]
            names += [f"router-{rname}-utility-{p:g}" for p in r.prices]
        return names

    def resolve(self, name: Any) -> tuple[str | None, Rule | None, list[str]]:
        """(router name or None, its decision rule, candidate models) for a requested model name; 404 if unknown."""
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"model must be a non-empty string, got {name!r}", "model", "invalid_value")
        if name in self.models:
            return None, None, [name]
        m = ROUTER_NAME.match(name)
        if m and m.group("name") in self.routers:
            v = float(m.group("value"))
            if m.group("utility"):
                return m.group("name"), Rule("utility", v), list(self.routers[m.group("name")].models)
            if not 0.0 <= v <= 1.0:
                raise ApiError(400, f"router threshold {v} in {name!r} must be in [0, 1]", "model", "invalid_value")
            return m.group("name"), Rule("threshold", v), list(self.routers[m.group("name")].models)
        raise ApiError(
            404, f"The model {name!r} does not exist; served: {self.model_names()}", "model", "model_not_found"
        )

    def sampling(self, body: dict, *, chat: bool) -> Sampling:
        """The request's sampling settings, validated (400 naming the field)."""
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, self.default_max_tokens, 1, 1 << 20, integer=True)
        temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
        top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
        if top_p <= 0:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p", "invalid_value")
        n = _number(body, "n", 1, 1, MAX_N, integer=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, f"seed must be an integer, got {seed!r}", "seed", "invalid_value")
        stop = body.get("stop")
        stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(
                400, f"stop must be a string or up to 4 non-empty strings, got {stop!r}", "stop", "invalid_value"
            )
        return Sampling(
            int(max_tokens),
            temperature,
            top_p if top_p < 1.0 else None,
            int(n),
            None if seed is None else int(seed),
            tuple(stop),
        )

    def chat_prompt(self, model: str, messages: Any) -> str:
        """The prompt text a chat maps to for `model`'s format (see the module docstring)."""
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", "messages", "invalid_value")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or "role" not in msg:
                raise ApiError(
                    400, f"messages[{i}] must have a 'role' and a string 'content'", f"messages[{i}]", "invalid_value"
                )
        name = self.models[model].cfg.tokenizer
        if name == "arith":
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise ApiError(400, "the arithmetic chat format needs a user message", "messages", "invalid_value")
            text = messages[users[-1]]["content"].strip()
            return (text if text.startswith("Q ") else "Q " + text) + "\n"
        if name == "text":
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        raise ApiError(
            400,
            f"model {model!r} (tokenizer {name!r}) has no chat format; use /v1/completions",
            "model",
            "chat_not_supported",
        )

    def encode(self, model: str, text: str, param: str) -> np.ndarray:
        """BOS + ids of `text` for `model`; 400 naming the character and its position if it is outside the alphabet."""
        if not isinstance(text, str):
            raise ApiError(400, f"{param} must be a string, got {type(text).__name__}", param, "invalid_value")
        try:
            return data.encode_text_prompt(text, self.tokenizers[model])
        except ValueError as e:
            raise ApiError(400, f"{param}: {e}", param, "invalid_characters") from None

    def choose(
        self, router: str | None, rule: Rule | None, candidates: list[str], texts: Sequence[str], max_tokens: int = 16
    ) -> list[str]:
        """The model that answers each of `texts`: the only candidate, or the router's picks under `rule` (one
        `predict` call for all of them)."""
        if router is None:
            return [candidates[0]] * len(texts)
        q = Queries.from_prompts(list(texts))
        probs = self.routers[router].router.predict(q)
        if rule.kind == "utility":
            picks = []
            for i, text in enumerate(texts):
                cost = [
                    lm.flops(self.models[m].cfg, len(self.encode(m, text, "prompt")), max_tokens) for m in candidates
                ]
                picks.append(int(route_utility(probs[i : i + 1], np.maximum.accumulate(cost), rule.value)[0]))
        else:
            picks = route(probs, rule.value, q.tiebreak)
        return [candidates[int(k)] for k in picks]

    def _check_length(self, model: str, ids: np.ndarray, s: Sampling) -> None:
        ctx = self.models[model].cfg.max_seq_len
        if len(ids) + s.max_tokens > ctx:
            raise ApiError(
                400,
                f"max_tokens {s.max_tokens} + prompt tokens {len(ids)} exceeds model {model!r}'s "
                f"context of {ctx} tokens",
                "max_tokens",
                "context_length_exceeded",
            )

    async def complete(
        self, model_name: Any, texts: Sequence[str], s: Sampling, params: Sequence[str] | None = None
    ) -> list[Choice]:
        """len(texts) * n choices (prompt-major), generated through the batcher."""
        router, rule, candidates = self.resolve(model_name)
        params = params or ["prompt"] * len(texts)
        # Every prompt is checked against every candidate first: a router must not turn a bad request into a 200.
        for text, param in zip(texts, params):
            for m in candidates:
                self._check_length(m, self.encode(m, text, param), s)
        loop = asyncio.get_running_loop()
        if router is None:
            picks = [candidates[0]] * len(texts)
        else:  # a router may run a model (the hidden-state router): off the event loop
            picks = await loop.run_in_executor(None, self.choose, router, rule, candidates, texts, s.max_tokens)
        base = s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        futures = []
        for i, (text, model) in enumerate(zip(texts, picks)):
            ids = self.encode(model, text, params[i])
            seeds = [(base * 7919 + i * MAX_N + j) % (1 << 31) for j in range(s.n)]
            job = Job(model, [ids] * s.n, seeds, s.max_tokens, s.temperature, s.top_p)
            futures.append((model, len(ids), asyncio.wrap_future(self.batcher.submit(job))))
        out = []
        for model, n_prompt, fut in futures:
            for row in await fut:
                out.append(self._choice(model, row, s, n_prompt))
        return out

    def _choice(self, model: str, row: Row, s: Sampling, n_prompt: int) -> Choice:
        tk = self.tokenizers[model]
        pieces = [tk.decode(np.asarray([t])) for t in row.tokens]
        text = "".join(pieces)
        finish = "stop" if row.stopped else "length"
        keep = len(pieces)
        cut = min((text.find(x) for x in s.stop if x in text), default=-1)
        if cut >= 0:  # a stop string ends the choice (not included), as in the OpenAI API; so do its tokens
            text, finish, keep, acc = text[:cut], "stop", 0, 0
            while keep < len(pieces) and acc + len(pieces[keep]) <= cut:
                acc += len(pieces[keep])
                keep += 1
        return Choice(model, text, tuple(pieces[:keep]), tuple(float(x) for x in row.logprobs[:keep]), finish, n_prompt)
