"""The runner every topology drives: batched phases through a backend, the message log, tools, costs and failures.

A phase is one batched round: every `Request` of it goes to the backend at once (one `generate` for agents sharing a
model), unless the log already holds the phase committed, in which case its messages are read back (replay,
resume). Before anything is sent, a request whose prompt plus token budget exceeds the backend's context is
answered with the failure "message_too_long" (no generation); a reply that does not parse is the failure
"no_answer". Failures are counted per name and never raise.

Tools: `tool_pass` runs the calculator over solver texts. Each step line "aa op bb=cc" of a text becomes a call
calculator(a=carried, op, b, modulus) whose result replaces cc and is carried into the next step (the first step
carries the agent's own written start), so the arithmetic is the tool's and the chain's ops and operands the
agent's. Calls at step depth d of every row form one batch (depth d + 1 needs depth d's results). A call the tool
rejects (its JSON schema, or an error) is the failure "tool_error" and leaves that row's answer unread.

Planting (error injection): `plant` is a set of (phase, agent, task); the reply of such a message is replaced by
`planted_text(request)` (a solution with one wrong step) before it is logged, so the log and a replay see exactly
what the system saw.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from framework.agents import formats
from framework.agents import log as log_lib
from framework.agents.backend import Reply, Request
from framework.tasks.arithmetic import Problem

RUN_TASK = "run"
CALCULATOR = "calculator"


@dataclasses.dataclass
class RunResult:
    """Outcome of a topology on a list of problems: answers, verdicts, failures, costs and debate changes.

    per_agent[i]: messages, prompt_tokens, new_tokens, flops of agent i. changes: revisions in debates counted as
    right_to_wrong, wrong_to_right, kept_right, kept_wrong. generate_calls: phases sent to the backend in this
    call (0 for a replay); it is not part of `summary`.
    """

    answers: list[int | None]
    correct: list[bool]
    failures: dict[str, int]
    per_agent: dict[int, dict[str, float]]
    changes: dict[str, int]
    generate_calls: int = 0

    @property
    def accuracy(self) -> float:
        """Fraction of problems answered right."""
        return sum(self.correct) / max(len(self.correct), 1)

    @property
    def flops(self) -> float:
        """Every message's FLOPs summed."""
        return float(sum(a["flops"] for a in self.per_agent.values()))

    @property
    def flops_per_solved(self) -> float:
        """FLOPs spent per problem answered right (inf when none is)."""
        return self.flops / sum(self.correct) if any(self.correct) else float("inf")

    def summary(self) -> dict:
        """A JSON-ready dict of everything that a replay must reproduce."""
        return {
            "answers": list(self.answers),
            "correct": list(self.correct),
            "accuracy": self.accuracy,
            "failures": dict(sorted(self.failures.items())),
            "per_agent": {str(k): dict(v) for k, v in sorted(self.per_agent.items())},
            "flops": self.flops,
            "changes": dict(sorted(self.changes.items())),
        }


class Runner:
    """Sends phases to a backend (or reads them from the log), runs tool passes, keeps costs and failures."""

    def __init__(self, backend, *, log: log_lib.MessageLog | None = None, tools=None, plant=None):
        self.backend, self.tools = backend, tools
        self.log = log if log is not None else log_lib.MessageLog(None)
        self.plant: set[tuple[str, int, int]] = set(plant or ())
        self.failures: collections.Counter = collections.Counter()
        self.changes: collections.Counter = collections.Counter()
        self.per_agent: dict[int, dict[str, float]] = {}
        self.generated = 0

    def _account(self, agent: int, reply: Reply) -> None:
        a = self.per_agent.setdefault(agent, dict(messages=0, prompt_tokens=0, new_tokens=0, flops=0.0))
        a["messages"] += 1
        a["prompt_tokens"] += reply.prompt_tokens
        a["new_tokens"] += reply.new_tokens
        a["flops"] += reply.flops

    def start(self, num_tasks: int) -> None:
        """Records every problem's task as submitted (once per log)."""
        if not self.log.records:
            for t in range(num_tasks):
                self.log.append(log_lib.status_record(self.log.context_id, f"p{t}", "submitted"))

    def round(
        self,
        phase: str,
        requests: Sequence[Request],
        parse: Callable[[Request, str], Any],
        planted_text: Callable[[Request], str] | None = None,
    ) -> list[tuple[str, Any]]:
        """Runs one phase: (text, parsed value or None) per request, in order."""
        ctx = self.log.context_id
        logged = self.log.committed(phase)
        if logged is not None:
            replies = []
            for r in requests:
                rec = logged.get(f"{phase}/{r.message_id}")
                if rec is None:
                    raise ValueError(
                        f"message log: phase {phase!r} has no message {r.message_id!r}; not this run's log"
                    )
                d = log_lib.message_data(rec)
                replies.append(
                    Reply(log_lib.message_text(rec), d["prompt_tokens"], d["new_tokens"], d["flops"], d["failure"])
                )
        else:
            limit = self.backend.max_context
            fits = [self.backend.prompt_tokens(r) + r.max_new_tokens <= limit for r in requests]
            sent = [r for r, ok in zip(requests, fits) if ok]
            answered = iter(self.backend(phase, sent) if sent else [])
            if sent:
                self.generated += 1
            replies = []
            for r, ok in zip(requests, fits):
                if not ok:
                    replies.append(Reply("", self.backend.prompt_tokens(r), 0, 0.0, "message_too_long"))
                    continue
                reply = next(answered)
                if planted_text is not None and (phase, r.agent, r.task) in self.plant:
                    reply = dataclasses.replace(reply, text=planted_text(r))
                replies.append(reply)
        out = []
        for r, reply in zip(requests, replies):
            value = parse(r, reply.text) if reply.failure is None else None
            failure = reply.failure or (None if value is not None else "no_answer")
            if logged is None:
                data = dict(
                    phase=phase,
                    agent=r.agent,
                    task=r.task,
                    role=r.role,
                    value=value,
                    prompt_tokens=reply.prompt_tokens,
                    new_tokens=reply.new_tokens,
                    flops=reply.flops,
                    failure=failure,
                    planted=(phase, r.agent, r.task) in self.plant,
                )
                self.log.append(log_lib.message_record(ctx, f"p{r.task}", f"{phase}/{r.message_id}", reply.text, data))
            self._account(r.agent, reply)
            if failure:
                self.failures[failure] += 1
            out.append((reply.text, value))
        if logged is None:
            self.log.append(log_lib.status_record(ctx, RUN_TASK, "working", metadata={"phase": phase}))
        return out

    def tool_pass(self, phase: str, rows: Sequence[tuple[Request, Problem, str]]) -> list[tuple[str, int | None]]:
        """Recomputes each solver text's steps with the calculator; (rewritten text, answer) per row."""
        chains = [_steps(p, text) for _, p, text in rows]
        carried = [steps[0][0] if steps else None for steps in chains]
        alive = [bool(steps) for steps in chains]
        done: list[list[str]] = [[] for _ in rows]
        depth = max((len(s) for s in chains), default=0)
        ctx = self.log.context_id
        for d in range(depth):
            idx = [i for i in range(len(rows)) if alive[i] and d < len(chains[i])]
            calls = [
                (
                    CALCULATOR,
                    {"a": carried[i], "op": chains[i][d][1], "b": chains[i][d][2], "modulus": rows[i][1].modulus},
                )
                for i in idx
            ]
            sub = f"{phase}/tool{d}"
            logged = self.log.committed(sub)
            if logged is not None:
                results = []
                for i in idx:
                    dd = log_lib.message_data(logged[f"{sub}/a{rows[i][0].agent}/p{rows[i][0].task}"])
                    results.append((dd["result"], dd["error"]))
            else:
                results = [(res.value, res.error) for res in self.tools.call_batch(calls)]
                for i, (name, args), (value, error) in zip(idx, calls, results):
                    r = rows[i][0]
                    data = dict(
                        phase=sub, agent=r.agent, task=r.task, tool=name, arguments=args, result=value, error=error
                    )
                    text = str(value) if error is None else error
                    self.log.append(log_lib.message_record(ctx, f"p{r.task}", f"{sub}/{r.message_id}", text, data))
                self.log.append(log_lib.status_record(ctx, RUN_TASK, "working", metadata={"phase": sub}))
            for i, (value, error) in zip(idx, results):
                if error is not None:
                    self.failures["tool_error"] += 1
                    alive[i] = False
                    continue
                a, op, b = carried[i], chains[i][d][1], chains[i][d][2]
                w = rows[i][1].width
                done[i].append(f"{a:0{w}d}{op}{b:0{w}d}={int(value):0{w}d}\n")
                carried[i] = int(value)
        out = []
        for i, (_, p, text) in enumerate(rows):
            if not chains[i]:
                out.append((text, formats.parse_solution(p, text)))
            elif not alive[i]:
                out.append((text, None))
            else:
                out.append(("".join(done[i]) + formats.answer_text(carried[i], p.width), carried[i]))
        return out

    def result(self, problems: Sequence[Problem], answers: Sequence[int | None]) -> RunResult:
        """Writes each problem's artifact and final status (once per log) and returns the run's result."""
        correct = [a is not None and a == p.answer for p, a in zip(problems, answers)]
        ctx = self.log.context_id
        if not self.log.has_final():
            for t, (a, ok) in enumerate(zip(answers, correct)):
                self.log.append(log_lib.artifact_record(ctx, f"p{t}", "answer", {"answer": a, "correct": ok}))
                self.log.append(
                    log_lib.status_record(ctx, f"p{t}", "completed" if a is not None else "failed", final=True)
                )
            self.log.append(log_lib.status_record(ctx, RUN_TASK, "completed", final=True))
        return RunResult(
            list(answers), correct, dict(self.failures), self.per_agent, dict(self.changes), self.generated
        )


def _steps(problem: Problem, text: str) -> list[tuple[int, str, int]]:
    """(a, op, b) of the step lines before the first answer line or unreadable line."""
    w = problem.width
    pat = re.compile(f"([0-9]{{{w}}})([-+*])([0-9]{{{w}}})=([0-9]{{{w}}})")
    out = []
    for line in text.split("\n"):
        m = pat.fullmatch(line)
        if m is None:
            break
        out.append((int(m.group(1)), m.group(2), int(m.group(3))))
    return out
