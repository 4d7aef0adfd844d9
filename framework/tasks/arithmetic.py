"""Modular-arithmetic chains: the reference task, with exact per-step ground truth.

A problem is a start value and K operations applied left to right, every intermediate reduced mod M (default
M = 100). Every number is written zero-padded to the width of M - 1 (two digits for M = 100). The prompt is one
line, the gold solution one line per step and the answer on the last line; every line ends with "\\n":

    Q 23+45*03-17          <- format_prompt(problem)
    23+45=68               <- format_solution(problem) starts here
    68*03=04
    04-17=87
    A 87

Answer mod m (`answer_mod`): the question may ask for the final value mod a small m (2 <= m < M), written as a
"%" suffix on the prompt, m with the same width as every other number. The steps are unchanged; only the answer
line changes, to `final_value % m`, same width again. With m = 7 the example above becomes

    Q 23+45*03-17%07
    23+45=68
    68*03=04
    04-17=87
    A 03

so a wrong chain reaches the right answer with probability about 1/m: a tunable "correct answer, flawed process"
rate.

The checker (`check_solution`) parses strictly. The text is the completion after the prompt (a copy of the prompt
at its start is skipped). It is split on "\\n" (an empty piece after the last "\\n" is not a line); the first line
starting with "A" is the answer line and ends the solution (everything after it is ignored); every line before it
is a step line and must match `^([0-9]{w})([+*-])([0-9]{w})=([0-9]{w})$` exactly (w = width, no spaces). A
line that does not (a blank line included) is a written but incorrect step. The answer line must match
`^A ([0-9]{w})$`. Malformed text never raises.

Difficulty knobs live in `Knobs` (num_steps, ops, op_weights, modulus, answer_mod); `sample_problems`,
`problem_at` and the data pipeline take exactly these keyword names.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

OPS = "+-*"
DEFAULT_MODULUS = 100
DEFAULT_NUM_STEPS = (1, 8)


def number_width(modulus: int) -> int:
    """Digits every number is written with for a modulus: the width of `modulus - 1`."""
    return len(str(modulus - 1))


def apply_op(a: int, op: str, b: int, modulus: int) -> int:
    """One step of the chain: `(a op b) mod modulus`."""
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"unknown op {op!r}; expected one of {OPS!r}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One chain: `start`, then `ops[i]` with `operands[i]` for i < K, every value reduced mod `modulus`."""

    start: int
    ops: tuple[str, ...]
    operands: tuple[int, ...]
    modulus: int = DEFAULT_MODULUS
    answer_mod: int | None = None

    def __post_init__(self):
        _check_modulus(self.modulus, self.answer_mod)
        object.__setattr__(self, "ops", tuple(self.ops))  # lists from callers would make the problem unhashable
        object.__setattr__(self, "operands", tuple(int(x) for x in self.operands))
        if len(self.ops) != len(self.operands):
            raise ValueError(f"Problem has {len(self.ops)} ops but {len(self.operands)} operands")
        if not self.ops:
            raise ValueError("Problem needs at least one step (num_steps >= 1)")
        for i, op in enumerate(self.ops):
            if op not in OPS:
                raise ValueError(f"Problem op {i} is {op!r}; expected one of {OPS!r}")
        for name, v in [("start", self.start)] + [(f"operand {i}", x) for i, x in enumerate(self.operands)]:
            if not 0 <= v < self.modulus:
                raise ValueError(f"Problem {name} = {v} is outside [0, {self.modulus})")

    @property
    def num_steps(self) -> int:
        """K, the number of operations."""
        return len(self.ops)

    @property
    def width(self) -> int:
        """Digits every number of this problem is written with."""
        return number_width(self.modulus)

    def values(self) -> tuple[int, ...]:
        """Gold values: the start, then the value after each step (length K + 1)."""
        vals = [self.start]
        for op, b in zip(self.ops, self.operands):
            vals.append(apply_op(vals[-1], op, b, self.modulus))
        return tuple(vals)

    @property
    def answer(self) -> int:
        """Gold answer: the final value, reduced mod `answer_mod` when set."""
        final = self.values()[-1]
        return final if self.answer_mod is None else final % self.answer_mod


def _check_modulus(modulus: int, answer_mod: int | None) -> None:
    if not isinstance(modulus, (int, np.integer)) or modulus < 2:
        raise ValueError(f"modulus = {modulus!r}; expected an int >= 2")
    if answer_mod is not None and (not isinstance(answer_mod, (int, np.integer)) or not 2 <= answer_mod < modulus):
        raise ValueError(f"answer_mod = {answer_mod!r}; expected None or an int in [2, modulus={modulus})")


def _fmt(v: int, width: int) -> str:
    return str(v).zfill(width)


def format_prompt(problem: Problem) -> str:
    """The question line, e.g. "Q 23+45*03-17\\n" (or "...%07\\n" with answer_mod=7)."""
    w = problem.width
    parts = ["Q ", _fmt(problem.start, w)]
    for op, b in zip(problem.ops, problem.operands):
        parts += [op, _fmt(b, w)]
    if problem.answer_mod is not None:
        parts += ["%", _fmt(problem.answer_mod, w)]
    return "".join(parts) + "\n"


def format_solution(problem: Problem) -> str:
    """The gold trace: one "aa+bb=cc\\n" line per step, then "A xx\\n"."""
    w = problem.width
    vals = problem.values()
    lines = [
        f"{_fmt(vals[i], w)}{op}{_fmt(b, w)}={_fmt(vals[i + 1], w)}\n"
        for i, (op, b) in enumerate(zip(problem.ops, problem.operands))
    ]
    lines.append(f"A {_fmt(problem.answer, w)}\n")
    return "".join(lines)


def prompt_length(num_steps: int, modulus: int = DEFAULT_MODULUS, answer_mod: int | None = None) -> int:
    """Characters in the prompt of a K-step problem (trailing newline included)."""
    w = number_width(modulus)
    return 2 + w + num_steps * (1 + w) + (0 if answer_mod is None else 1 + w) + 1


def solution_length(num_steps: int, modulus: int = DEFAULT_MODULUS) -> int:
    """Characters in the gold solution of a K-step problem (answer line included)."""
    w = number_width(modulus)
    return num_steps * (3 * w + 3) + (2 + w + 1)


# ---------------------------------------------------------------------------------------------------------------
# Difficulty knobs and sampling.


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The generator's difficulty knobs, validated; the one place their names and defaults live.

    num_steps: K, an int or an inclusive (lo, hi) range sampled uniformly; lo >= 1.
    ops: which operations occur, a string (or sequence) of distinct characters from "+-*".
    op_weights: relative frequency of each entry of `ops` (None: uniform); non-negative, positive sum.
    modulus: M >= 2; every value is reduced mod M.
    answer_mod: None, or m in [2, M): the answer asked for is the final value mod m.
    """

    num_steps: int | tuple[int, int] = DEFAULT_NUM_STEPS
    ops: str = OPS
    op_weights: tuple[float, ...] | None = None
    modulus: int = DEFAULT_MODULUS
    answer_mod: int | None = None

    def __post_init__(self):
        lo, hi = _steps_range(self.num_steps)
        object.__setattr__(self, "num_steps", lo if lo == hi else (lo, hi))
        ops = self.ops if isinstance(self.ops, str) else "".join(self.ops)
        bad = [c for c in ops if c not in OPS]
        if bad or not ops:
            raise ValueError(f"ops = {self.ops!r}: unknown op {bad[0]!r}" if bad else "ops is empty")
        if len(set(ops)) != len(ops):
            raise ValueError(f"ops = {ops!r} repeats an op; use op_weights to change frequencies")
        object.__setattr__(self, "ops", ops)
        if self.op_weights is not None:
            w = tuple(float(x) for x in self.op_weights)
            if len(w) != len(ops):
                raise ValueError(f"op_weights has {len(w)} entries but ops = {ops!r} has {len(ops)}")
            if any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"op_weights = {w}; expected finite non-negative weights with a positive sum")
            object.__setattr__(self, "op_weights", w)
        _check_modulus(self.modulus, self.answer_mod)

    @classmethod
    def from_config(cls, task: Mapping[str, Any]) -> Knobs:
        """The knobs of a config's `task` section (its other keys, e.g. loss_on and pack, belong to the data)."""
        names = [f.name for f in dataclasses.fields(cls)]
        kw = {k: tuple(task[k]) if isinstance(task[k], (list, tuple)) else task[k] for k in names if k in task}
        return make_knobs(**kw)

    @property
    def steps_range(self) -> tuple[int, int]:
        """Inclusive (lo, hi) range of K."""
        return _steps_range(self.num_steps)

    @property
    def probabilities(self) -> np.ndarray:
        """Probability of each op in `ops`."""
        w = np.ones(len(self.ops)) if self.op_weights is None else np.asarray(self.op_weights, np.float64)
        return w / w.sum()

    @functools.cached_property
    def cumulative_probabilities(self) -> np.ndarray:
        """Cumulative op probabilities, the last exactly 1.0 (so a uniform draw in [0, 1) never overflows)."""
        cum = np.cumsum(self.probabilities)
        cum[-1] = 1.0
        cum.flags.writeable = False
        return cum

    def problem_at(self, seed: int, index: int) -> Problem:
        """The `index`-th problem of the stream `seed` under these knobs (see module-level `problem_at`)."""
        return _draw(np.random.default_rng([_check_seed(seed), _check_seed(index, "index")]), self)

    def as_kwargs(self) -> dict:
        """The knobs as keyword arguments for `sample_problems`, `problem_at` and the data pipeline."""
        return dataclasses.asdict(self)


def _steps_range(num_steps) -> tuple[int, int]:
    if isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool):
        lo = hi = int(num_steps)
    elif isinstance(num_steps, Sequence) and not isinstance(num_steps, str) and len(num_steps) == 2:
        lo, hi = (int(x) for x in num_steps)
    else:
        raise ValueError(f"num_steps = {num_steps!r}; expected an int or an inclusive (lo, hi) pair")
    if lo < 1 or hi < lo:
        raise ValueError(f"num_steps = {num_steps!r}; expected 1 <= lo <= hi")
    return lo, hi


def _draw(rng: np.random.Generator, knobs: Knobs) -> Problem:
    lo, hi = knobs.steps_range
    k = int(rng.integers(lo, hi + 1))
    values = rng.integers(0, knobs.modulus, size=k + 1).tolist()  # start, then the K operands
    op_idx = np.searchsorted(knobs.cumulative_probabilities, rng.random(k), side="right").tolist()
    return Problem(
        start=values[0],
        ops=tuple(knobs.ops[i] for i in op_idx),
        operands=tuple(values[1:]),
        modulus=knobs.modulus,
        answer_mod=knobs.answer_mod,
    )


def _check_seed(value, name: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} = {value!r}; expected a non-negative int")
    return int(value)


def problem_at(seed: int, index: int, **knobs) -> Problem:
    """The `index`-th problem of the stream `seed`, drawn independently of every other index.

    Uses `np.random.default_rng([seed, index])`, so data order is deterministic and resumable whatever the batch
    size. `knobs` are the `Knobs` fields (num_steps, ops, op_weights, modulus, answer_mod).
    """
    return make_knobs(**knobs).problem_at(seed, index)


def sample_problems(
    rng_or_seed: int | np.random.Generator,
    n: int,
    *,
    num_steps: int | tuple[int, int] = DEFAULT_NUM_STEPS,
    ops: str = OPS,
    op_weights: Sequence[float] | None = None,
    modulus: int = DEFAULT_MODULUS,
    answer_mod: int | None = None,
) -> list[Problem]:
    """Draw `n` problems; deterministic in the seed (or in the Generator's state).

    With an int seed the result is `[problem_at(seed, i, ...) for i in range(n)]`; with a Generator the problems
    are drawn from it in sequence (advancing it).
    """
    knobs = make_knobs(num_steps=num_steps, ops=ops, op_weights=op_weights, modulus=modulus, answer_mod=answer_mod)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n = {n!r}; expected a non-negative int")
    if isinstance(rng_or_seed, np.random.Generator):
        return [_draw(rng_or_seed, knobs) for _ in range(n)]
    return [knobs.problem_at(rng_or_seed, i) for i in range(n)]


def make_knobs(**kw) -> Knobs:
    """Validated `Knobs` from keyword arguments; an unknown knob name is a ValueError listing the valid ones."""
    names = [f.name for f in dataclasses.fields(Knobs)]
    unknown = sorted(set(kw) - set(names))
    if unknown:
        raise ValueError(f"unknown task knob(s) {unknown}; expected some of {names}")
    try:
        return _cached_knobs(**kw)
    except TypeError:  # an unhashable value (a list, an array): validate without the cache
        return Knobs(**kw)


@functools.lru_cache(maxsize=64)
def _cached_knobs(**kw) -> Knobs:
    return Knobs(**kw)


# ---------------------------------------------------------------------------------------------------------------
# The checker.


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Verdict on a written solution.

    step_ok[i]: step i is written, parses, starts from the value carried from the previous written step (the
      start value for step 0), uses the problem's i-th op and operand, and its result is right for the operands
      written. Length K.
    on_gold_path[i]: step i is written and steps 0..i are all ok (the prefix still equals the gold trace). Length K.
    first_error: index of the first step that is not ok, a missing step included; K if all K are ok but an extra
      step line follows; None if exactly the K gold steps are written.
    values_written: the result each written step line states (None where unparseable); one per step line.
    answer: the value on the "A xx" line, None if there is none or it does not parse.
    answer_correct: answer == problem.answer.
    """

    step_ok: tuple[bool, ...]
    on_gold_path: tuple[bool, ...]
    first_error: int | None
    values_written: tuple[int | None, ...]
    answer: int | None
    answer_correct: bool

    @property
    def num_steps_written(self) -> int:
        """Step lines before the answer line (unparseable ones included)."""
        return len(self.values_written)

    @property
    def process_correct(self) -> bool:
        """Every step is on the gold path and nothing extra is written."""
        return self.first_error is None


@functools.lru_cache(maxsize=16)
def _patterns(width: int) -> tuple[re.Pattern, re.Pattern]:
    num = f"([0-9]{{{width}}})"
    return re.compile(f"{num}([-+*]){num}={num}"), re.compile(f"A {num}")


def check_solution(problem: Problem, text: str) -> CheckResult:
    """Check a written solution step by step against `problem`; never raises on malformed text."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    prompt = format_prompt(problem)
    if text.startswith(prompt):
        text = text[len(prompt) :]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    step_re, answer_re = _patterns(problem.width)
    m, k = problem.modulus, problem.num_steps

    step_ok: list[bool] = []
    written: list[int | None] = []
    answer = None
    carried: int | None = problem.start
    for line in lines:
        if line.startswith("A"):
            match = answer_re.fullmatch(line)
            answer = int(match.group(1)) if match else None
            break
        match = step_re.fullmatch(line)
        i = len(written)
        if match is None:
            written.append(None)
            carried = None
            if i < k:
                step_ok.append(False)
            continue
        a, op, b, c = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
        ok = (
            i < k
            and a == carried
            and op == problem.ops[i]
            and b == problem.operands[i]
            and c < m
            and c == apply_op(a, op, b, m)
        )
        if i < k:
            step_ok.append(bool(ok))
        written.append(c)
        carried = c
    step_ok += [False] * (k - len(step_ok))

    on_path, good = [], True
    for i in range(k):
        good = good and step_ok[i]
        on_path.append(good)
    first_error = next((i for i, ok in enumerate(step_ok) if not ok), None)
    if first_error is None and len(written) > k:
        first_error = k
    return CheckResult(
        step_ok=tuple(step_ok),
        on_gold_path=tuple(on_path),
        first_error=first_error,
        values_written=tuple(written),
        answer=answer,
        answer_correct=answer is not None and answer == problem.answer,
    )
