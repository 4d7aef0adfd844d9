"""Multi-agent topologies over the arithmetic chains: single, vote, debate, centralised, hybrid, pipeline.

Glossary: P problems, N agents (or workers, or stages), R revise rounds, W workers.

Every phase is one batched round over all its agents and problems (`Runner.round`). Agent indices:

  single       agent 0 solves.                                                     1 phase
  vote         agents 0..N-1 solve; the majority answer wins.                       1 phase
  debate       agents 0..N-1 solve, then R rounds where each sees its own and the others' last answers and keeps or
               revises (formats.revise_prompt); the majority of the last answers wins.   1 + R phases
  centralised  orchestrator 0 splits the chain into pieces; per piece, workers 1..W solve it from the carried value,
               verifier W+1 checks each worker's text; the first worker (by index) the verifier accepts gives the
               piece's result (the workers' majority if it accepts none); the orchestrator assembles the answer.
               2 + 2 x pieces phases (1 + pieces without the verifier)
  hybrid       as centralised, but per piece the workers debate R rounds and their majority is the result; no
               verifier.  2 + (1 + R) x pieces phases
  pipeline     stage i (agent i) solves the i-th of N even consecutive pieces from the value stage i - 1 handed on;
               the last stage's value is the answer.  N phases (a stage with no steps for a problem skips it)

Majority: the most frequent readable answer; a tie goes to the answer of the lowest-index agent among the tied ones;
no readable answer gives no answer. With `tools=True` every solving phase's texts go through the calculator
(`Runner.tool_pass`). With `plant=True` one wrong step is planted in the first solving message of one agent for every
problem (single/vote/debate: agent 0's first solution; centralised/hybrid: worker 1's text for piece 0; pipeline:
the first stage each problem runs), the error-injection experiment.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from framework.agents import formats
from framework.agents import log as log_lib
from framework.agents.backend import Request
from framework.agents.runner import Runner, RunResult
from framework.tasks import arithmetic
from framework.tasks.arithmetic import Problem

KINDS = ("single", "vote", "debate", "centralised", "hybrid", "pipeline")


@dataclasses.dataclass(frozen=True)
class Topology:
    """Which topology and its sizes; validated on construction (before anything runs).

    agents: N for vote/debate, W workers for centralised/hybrid, N stages for pipeline, 1 for single.
    rounds: R revise rounds (debate, hybrid; >= 1); 0 elsewhere.
    piece_steps: operations per piece the orchestrator is trained to cut (centralised, hybrid).
    verify: centralised only: whether the verifier checks the workers.
    tools: solving texts go through the MCP calculator.
    """

    kind: str
    agents: int = 1
    rounds: int = 0
    piece_steps: int = 2
    verify: bool = True
    tools: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"topology kind = {self.kind!r}; expected one of {KINDS}")
        for name in ("agents", "rounds", "piece_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"topology {self.kind}: {name} = {v!r}; expected an int")
        if self.agents < 1:
            raise ValueError(f"topology {self.kind}: agents = {self.agents}; expected >= 1")
        if self.kind == "single" and self.agents != 1:
            raise ValueError(f"topology single: agents = {self.agents}; expected 1")
        if self.kind in ("debate", "hybrid"):
            if self.agents < 2:
                raise ValueError(f"topology {self.kind}: agents = {self.agents}; expected >= 2 (peers to debate)")
            if self.rounds < 1:
                raise ValueError(f"topology {self.kind}: rounds = {self.rounds}; expected >= 1")
        elif self.rounds != 0:
            raise ValueError(f"topology {self.kind}: rounds = {self.rounds}; only debate and hybrid have rounds (0)")
        if self.piece_steps < 1:
            raise ValueError(f"topology {self.kind}: piece_steps = {self.piece_steps}; expected >= 1")

    @property
    def num_agents(self) -> int:
        """How many agent indices the topology uses (orchestrator and verifier included)."""
        if self.kind == "centralised":
            return self.agents + 1 + int(self.verify)
        if self.kind == "hybrid":
            return self.agents + 1
        return self.agents


def majority(values: Sequence[int | None]) -> int | None:
    """Most frequent non-None value; ties go to the one that occurs first; None if all are None."""
    counts = collections.Counter(v for v in values if v is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(v for v in values if v is not None and counts[v] == best)


def _solve_len(p: Problem) -> int:
    return arithmetic.solution_length(p.num_steps, p.modulus) + 1


def _solve(runner: Runner, topo: Topology, phase: str, rows: Sequence[tuple[int, int, Problem]]) -> list:
    """Solver phase over (agent, task, problem) rows: (text, answer) per row (calculator pass with tools)."""
    reqs = [Request(a, t, "solve", formats.solve_prompt(p), _solve_len(p)) for a, t, p in rows]
    probs = {(a, t): p for a, t, p in rows}
    out = runner.round(
        phase,
        reqs,
        lambda r, text: formats.parse_solution(probs[r.agent, r.task], text),
        planted_text=lambda r: formats.planted_solution(probs[r.agent, r.task]),
    )
    if topo.tools:
        out = runner.tool_pass(phase, [(r, p, text) for r, (_, _, p), (text, _) in zip(reqs, rows, out)])
    return out


def _debate(runner, topo, phase, agents, tasks, problem_of) -> dict[int, int | None]:
    """Solve then R revise rounds among `agents` on each task; the majority of the last answers per task."""
    rows = [(a, t, problem_of[t]) for a in agents for t in tasks]
    first = _solve(runner, topo, phase, rows)
    cur = {(a, t): v for (a, t, _), (_, v) in zip(rows, first)}
    for r in range(1, topo.rounds + 1):
        reqs = [
            Request(
                a,
                t,
                "revise",
                formats.revise_prompt(problem_of[t], cur[a, t], [cur[b, t] for b in agents if b != a]),
                problem_of[t].width + 4,
            )
            for a in agents
            for t in tasks
        ]
        out = runner.round(
            f"{phase}/revise{r}" if phase != "solve" else f"revise{r}",
            reqs,
            lambda q, text: formats.parse_answer_line(text, problem_of[q.task].width),
        )
        for q, (_, v) in zip(reqs, out):
            gold = problem_of[q.task].answer
            was, now = cur[q.agent, q.task] == gold, v == gold
            runner.changes[
                ("kept_" if was == now else ("right_to_" if was else "wrong_to_")) + ("right" if now else "wrong")
            ] += 1
            cur[q.agent, q.task] = v
    return {t: majority([cur[a, t] for a in agents]) for t in tasks}


def _pieces_topology(runner: Runner, topo: Topology, problems: Sequence[Problem]) -> list[int | None]:
    """centralised and hybrid: split, per-piece work from carried values, assemble."""
    P = len(problems)
    workers = list(range(1, topo.agents + 1))
    split_reqs = [
        Request(0, t, "split", formats.split_prompt(p), p.num_steps * (2 + p.width) + 2) for t, p in enumerate(problems)
    ]
    splits = [
        v
        for _, v in runner.round("split", split_reqs, lambda r, text: formats.parse_split(text, problems[r.task].width))
    ]
    carried = [p.start if splits[t] is not None else None for t, p in enumerate(problems)]
    results: list[list[int | None]] = [[] for _ in range(P)]
    n_pieces = max((len(s) for s in splits if s is not None), default=0)
    for j in range(n_pieces):
        tasks = [t for t in range(P) if splits[t] is not None and len(splits[t]) > j and carried[t] is not None]
        if not tasks:
            break
        sub = {t: formats.piece_problem(carried[t], *splits[t][j], problems[t].modulus) for t in tasks}
        if topo.kind == "hybrid":
            chosen = _debate(runner, topo, f"piece{j}", workers, tasks, sub)
        else:
            rows = [(a, t, sub[t]) for a in workers for t in tasks]
            solved = _solve(runner, topo, f"piece{j}", rows)
            by = {(a, t): tv for (a, t, _), tv in zip(rows, solved)}
            verdicts = {}
            if topo.verify:
                vreqs = [
                    Request(topo.agents + 1, t, "verify", formats.verify_prompt(sub[t], by[a, t][0]), 3)
                    for a, t, _ in rows
                ]
                vout = _verify_round(runner, f"verify{j}", vreqs, [a for a, _, _ in rows])
                verdicts = {(a, t): v for (a, t, _), v in zip(rows, vout)}
            chosen = {}
            for t in tasks:
                ok = [by[a, t][1] for a in workers if verdicts.get((a, t)) and by[a, t][1] is not None]
                chosen[t] = ok[0] if ok else majority([by[a, t][1] for a in workers])
        for t in tasks:
            results[t].append(chosen[t])
            carried[t] = chosen[t]
    done = [
        t for t in range(P) if splits[t] is not None and carried[t] is not None and len(results[t]) == len(splits[t])
    ]
    reqs = [
        Request(0, t, "assemble", formats.assemble_prompt(problems[t], results[t]), problems[t].width + 4) for t in done
    ]
    out = runner.round("assemble", reqs, lambda r, text: formats.parse_answer_line(text, problems[r.task].width))
    answers: list[int | None] = [None] * P
    for r, (_, v) in zip(reqs, out):
        answers[r.task] = v
    return answers


def _verify_round(runner: Runner, phase: str, reqs: list[Request], workers: list[int]) -> list[bool | None]:
    """The verifier's phase; each request checks one worker's text (distinct message ids per worker)."""
    tagged = [_VerifyRequest(q.agent, q.task, q.role, q.prompt, q.max_new_tokens, w) for q, w in zip(reqs, workers)]
    return [v for _, v in runner.round(phase, tagged, lambda r, text: formats.parse_verdict(text))]


@dataclasses.dataclass(frozen=True)
class _VerifyRequest(Request):
    worker: int = 0

    @property
    def message_id(self) -> str:
        return f"a{self.agent}/w{self.worker}/p{self.task}"


def _pipeline(runner: Runner, topo: Topology, problems: Sequence[Problem]) -> list[int | None]:
    pieces = [formats.even_pieces(p, topo.agents) for p in problems]
    carried: list[int | None] = [p.start for p in problems]
    for i in range(topo.agents):
        tasks = [t for t in range(len(problems)) if pieces[t][i][0] and carried[t] is not None]
        if not tasks:
            continue
        rows = [(i, t, formats.piece_problem(carried[t], *pieces[t][i], problems[t].modulus)) for t in tasks]
        for (_, t, _), (_, v) in zip(rows, _solve(runner, topo, f"stage{i}", rows)):
            carried[t] = v
    return carried


def plant_points(topo: Topology, problems: Sequence[Problem]) -> list[tuple[str, int, int]]:
    """The (phase, agent, task) messages `run(..., plant=True)` plants a wrong step in, one per problem."""
    out = []
    for t, p in enumerate(problems):
        if topo.kind in ("single", "vote", "debate"):
            out.append(("solve", 0, t))
        elif topo.kind in ("centralised", "hybrid"):
            out.append(("piece0", 1, t))
        else:
            first = next(i for i, (ops, _) in enumerate(formats.even_pieces(p, topo.agents)) if ops)
            out.append((f"stage{first}", first, t))
    return out


def run(
    topo: Topology,
    problems: Sequence[Problem],
    backend,
    *,
    log: log_lib.MessageLog | None = None,
    tools=None,
    plant: bool = False,
) -> RunResult:
    """Runs `topo` on `problems` through `backend`, logging to `log`; resumes or replays from a log that has phases.

    `tools` is a tool client (`framework.agents.tools.ToolClient` or `LocalTools`) and is required with
    `topo.tools`. With `plant=True` one wrong step is planted per problem (see the module docstring).
    """
    if not isinstance(topo, Topology):
        raise ValueError(f"topo = {topo!r}; expected a Topology")
    problems = list(problems)
    if not problems:
        raise ValueError("problems is empty; expected at least one Problem")
    for i, p in enumerate(problems):
        if p.answer_mod is not None:
            raise ValueError(f"problems[{i}] has answer_mod = {p.answer_mod}; topologies take plain chains")
    if topo.tools and tools is None:
        raise ValueError(f"topology {topo.kind} has tools=True but no tool client was given (tools=None)")
    n_backend = len(getattr(backend, "agents", ())) or topo.num_agents
    if n_backend < topo.num_agents:
        raise ValueError(f"topology {topo.kind} uses {topo.num_agents} agents; the backend has {n_backend}")
    points = set(plant_points(topo, problems)) if plant else set()
    runner = Runner(backend, log=log, tools=tools, plant=points)
    runner.start(len(problems))
    if topo.kind in ("single", "vote"):
        rows = [(a, t, p) for a in range(topo.agents) for t, p in enumerate(problems)]
        out = _solve(runner, topo, "solve", rows)
        by_task = collections.defaultdict(list)
        for (_, t, _), (_, v) in zip(rows, out):
            by_task[t].append(v)
        answers = [majority(by_task[t]) for t in range(len(problems))]
    elif topo.kind == "debate":
        tasks = list(range(len(problems)))
        got = _debate(runner, topo, "solve", list(range(topo.agents)), tasks, dict(enumerate(problems)))
        answers = [got[t] for t in tasks]
    elif topo.kind == "pipeline":
        answers = _pipeline(runner, topo, problems)
    else:
        answers = _pieces_topology(runner, topo, problems)
    return runner.result(problems, answers)
