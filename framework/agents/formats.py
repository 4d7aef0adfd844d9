"""Role prompt formats of the arithmetic agents, their parsers, planted errors and the roles' training data.

Every message is printable text for the "text" tokenizer, one role per first letter of the prompt, every line ending
in "\\n". For the chain 23+45*03-17*02 (M = 100, pieces of two steps):

    role      prompt                                   completion (the gold target)
    solve     Q 23+45*03-17*02\\n                       23+45=68\\n68*03=04\\n04-17=87\\n87*02=74\\nA 74\\n
    revise    D 23+45*03-17*02\\nM 74\\nP 74 12\\n         A 74\\n   (keep one's own answer M or take a peer's, P)
    split     S 23+45*03-17*02\\n                       +45*03|-17*02\\n   (the start stays with the first piece)
    verify    V 68*03-17\\n<a worker's piece text>      Y\\n or N\\n   (is every step and the answer right?)
    assemble  C 23+45*03-17*02\\nR 04 74\\n              A 74\\n   (the last piece's result is the answer)

A piece is solved as a problem of its own (`Q 04-17*02`, start = the value carried from the previous piece), so
workers and pipeline stages use the solve format. An unreadable answer is written "??" where peers see it.
Parsers never raise: a reply that does not parse gives None (the runner records it as a failure).

Role training data (`role_source`) mixes the five roles; the revise target is the gold answer when it is among the
candidates shown (one's own or a peer's) and one's own answer otherwise, so a revising agent gains only by telling a
right peer from a wrong one, and loses when it drops a right answer of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

from framework.tasks import arithmetic
from framework.tasks.arithmetic import Problem
from framework.tasks.data import TextExample, TextSource

ROLES = ("solve", "revise", "split", "verify", "assemble")
UNREADABLE = "??"


def _fmt(v: int | None, width: int) -> str:
    return UNREADABLE[:1] * width if v is None else str(int(v)).zfill(width)


def chain_text(problem: Problem) -> str:
    """The chain without the "Q " marker or newline, e.g. "23+45*03-17"."""
    return arithmetic.format_prompt(problem)[2:-1]


def solve_prompt(problem: Problem) -> str:
    """The solver's prompt: the task's question line "Q <chain>\\n"."""
    return arithmetic.format_prompt(problem)


def revise_prompt(problem: Problem, mine: int | None, peers: Sequence[int | None]) -> str:
    """A debater's prompt: the chain, its own last answer and its peers' last answers (in agent order)."""
    w = problem.width
    return f"D {chain_text(problem)}\nM {_fmt(mine, w)}\nP {' '.join(_fmt(a, w) for a in peers)}\n"


def split_prompt(problem: Problem) -> str:
    """The orchestrator's split prompt."""
    return f"S {chain_text(problem)}\n"


def verify_prompt(piece: Problem, worker_text: str) -> str:
    """The verifier's prompt: the piece and a worker's text for it (a text cut short gets its closing newline)."""
    return f"V {chain_text(piece)}\n{worker_text}" + ("" if worker_text.endswith("\n") else "\n")


def assemble_prompt(problem: Problem, results: Sequence[int | None]) -> str:
    """The orchestrator's assemble prompt: the chain and every piece's result in order."""
    w = problem.width
    return f"C {chain_text(problem)}\nR {' '.join(_fmt(r, w) for r in results)}\n"


def answer_text(value: int, width: int) -> str:
    """An answer message "A xx\\n"."""
    return f"A {_fmt(value, width)}\n"


def parse_answer_line(text: str, width: int) -> int | None:
    """The value of a reply that is one answer line "A xx" (trailing text after the first line ignored)."""
    m = re.fullmatch(f"A ([0-9]{{{width}}})", text.split("\n", 1)[0])
    return int(m.group(1)) if m else None


def parse_solution(problem: Problem, text: str) -> int | None:
    """The answer a solver's text states (its "A xx" line), None if there is none."""
    return arithmetic.check_solution(problem, text).answer


def parse_verdict(text: str) -> bool | None:
    """True for "Y", False for "N", None otherwise."""
    first = text.split("\n", 1)[0]
    return {"Y": True, "N": False}.get(first)


def split_text(pieces: Sequence[tuple[tuple[str, ...], tuple[int, ...]]], width: int) -> str:
    """A split reply from pieces of (ops, operands)."""
    return "|".join("".join(f"{o}{_fmt(b, width)}" for o, b in zip(ops, bs)) for ops, bs in pieces) + "\n"


def gold_pieces(problem: Problem, piece_steps: int) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """The chain cut into consecutive pieces of `piece_steps` operations (the last may be shorter)."""
    k = problem.num_steps
    return [(problem.ops[i : i + piece_steps], problem.operands[i : i + piece_steps]) for i in range(0, k, piece_steps)]


def even_pieces(problem: Problem, n: int) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """The chain cut into n consecutive pieces as even as possible (the first ones longer; empty ones allowed)."""
    k = problem.num_steps
    bounds = [round(i * k / n) for i in range(n + 1)]
    return [(problem.ops[a:b], problem.operands[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def parse_split(text: str, width: int) -> list[tuple[tuple[str, ...], tuple[int, ...]]] | None:
    """Pieces of an orchestrator's split reply, None unless it is "|"-separated non-empty runs of op + number."""
    line = text.split("\n", 1)[0]
    group = f"(?:[-+*][0-9]{{{width}}})+"
    if not re.fullmatch(f"{group}(?:\\|{group})*", line):
        return None
    pieces = []
    for part in line.split("|"):
        steps = re.findall(f"([-+*])([0-9]{{{width}}})", part)
        pieces.append((tuple(o for o, _ in steps), tuple(int(b) for _, b in steps)))
    return pieces


def piece_problem(start: int, ops: Sequence[str], operands: Sequence[int], modulus: int) -> Problem:
    """The sub-problem a worker solves: a piece of ops and operands from a carried start value."""
    return Problem(start=int(start), ops=tuple(ops), operands=tuple(operands), modulus=modulus)


def planted_solution(problem: Problem, step: int = 0, delta: int = 1) -> str:
    """A solver's text with one wrong step planted: step `step`'s result is off by `delta` (mod M) and every later
    step is computed correctly from the wrong value, so the stated answer is wrong (the error propagates)."""
    m, w = problem.modulus, problem.width
    step = min(step, problem.num_steps - 1)
    lines, v = [], problem.start
    for i, (op, b) in enumerate(zip(problem.ops, problem.operands)):
        c = arithmetic.apply_op(v, op, b, m)
        if i == step:
            c = (c + delta) % m
        lines.append(f"{_fmt(v, w)}{op}{_fmt(b, w)}={_fmt(c, w)}\n")
        v = c
    answer = v if problem.answer_mod is None else v % problem.answer_mod
    return "".join(lines) + answer_text(answer, w)


# ---------------------------------------------------------------------------------------------------------------
# Role training data.


@dataclasses.dataclass(frozen=True)
class RoleMix:
    """Which roles the training stream holds and how often; knobs of the chains; candidates shown to a reviser."""

    weights: tuple[float, float, float, float, float] = (0.5, 0.2, 0.1, 0.1, 0.1)  # in ROLES order
    num_steps: tuple[int, int] = (1, 6)  # pieces and pipeline stages can be single steps
    modulus: int = 100
    piece_steps: int = 2
    peers: tuple[int, int] = (1, 4)  # number of peers a reviser is shown (inclusive range)

    def __post_init__(self):
        w = tuple(float(x) for x in self.weights)
        if len(w) != len(ROLES) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"RoleMix.weights = {self.weights!r}; expected {len(ROLES)} weights >= 0 ({ROLES})")
        if self.piece_steps < 1:
            raise ValueError(f"RoleMix.piece_steps = {self.piece_steps!r}; expected >= 1")
        arithmetic.make_knobs(num_steps=tuple(self.num_steps), modulus=self.modulus)


def _wrong(rng: np.random.Generator, gold: int, m: int) -> int:
    return int((gold + rng.integers(1, m)) % m)


def _noisy_solution(rng: np.random.Generator, problem: Problem) -> tuple[str, bool]:
    """A worker-like text for a piece: right half of the time, else one planted error."""
    if rng.random() < 0.5:
        return arithmetic.format_solution(problem), True
    step = int(rng.integers(problem.num_steps))
    return planted_solution(problem, step, int(rng.integers(1, problem.modulus))), False


def role_example(rng: np.random.Generator, mix: RoleMix) -> TextExample:
    """One training example of a role drawn from `mix` (prompt, gold completion); the role index is a field."""
    knobs = arithmetic.make_knobs(num_steps=tuple(mix.num_steps), modulus=mix.modulus)
    p = np.asarray(mix.weights, np.float64)
    role = int(rng.choice(len(ROLES), p=p / p.sum()))
    problem = knobs.problem_at(int(rng.integers(2**62)), 0)
    w, m = problem.width, problem.modulus
    if ROLES[role] == "solve":
        prompt, target = solve_prompt(problem), arithmetic.format_solution(problem)
    elif ROLES[role] == "revise":
        q = rng.uniform(0.1, 0.9)  # how often a candidate is right, varied so the reviser sees every regime
        n_peers = int(rng.integers(mix.peers[0], mix.peers[1] + 1))
        cands = [problem.answer if rng.random() < q else _wrong(rng, problem.answer, m) for _ in range(n_peers + 1)]
        target = problem.answer if problem.answer in cands else cands[0]
        prompt, target = revise_prompt(problem, cands[0], cands[1:]), answer_text(target, w)
    elif ROLES[role] == "split":
        prompt, target = split_prompt(problem), split_text(gold_pieces(problem, mix.piece_steps), w)
    elif ROLES[role] == "verify":
        k = min(problem.num_steps, mix.piece_steps)
        piece = piece_problem(problem.start, problem.ops[:k], problem.operands[:k], m)
        text, ok = _noisy_solution(rng, piece)
        prompt, target = verify_prompt(piece, text), ("Y\n" if ok else "N\n")
    else:
        vals = problem.values()
        results = [
            vals[min(i + mix.piece_steps, problem.num_steps)] for i in range(0, problem.num_steps, mix.piece_steps)
        ]
        prompt, target = assemble_prompt(problem, results), answer_text(problem.answer, w)
    return TextExample(prompt, target, {"role": role})


def _role_example_at(stream_seed: int, index: int, *, mix: RoleMix) -> TextExample:
    return role_example(np.random.default_rng([int(stream_seed), int(index)]), mix)


def role_source(mix: RoleMix = RoleMix()) -> TextSource:
    """The roles' training stream as a `TextSource` for `data.make_text_dataset(source, "text", ...)`."""
    k = mix.num_steps[1]
    w = arithmetic.number_width(mix.modulus)
    # verify is the longest: "V " + piece chain + "\n" + piece solution, then "Y\n"; solve: question + solution.
    solve = 1 + arithmetic.prompt_length(k, mix.modulus) + arithmetic.solution_length(k, mix.modulus) + 1
    ps = min(k, mix.piece_steps)
    verify = 1 + arithmetic.prompt_length(ps, mix.modulus) + arithmetic.solution_length(ps, mix.modulus) + 2 + 1
    revise = 1 + arithmetic.prompt_length(k, mix.modulus) + (3 + w) + 2 + (w + 1) * mix.peers[1] + (3 + w) + 1
    return TextSource(
        functools.partial(_role_example_at, mix=mix),
        name="agent_roles",
        min_tokens=8,
        max_tokens=max(solve, verify, revise),
        fields=("role",),
    )
