"""A toy policy and an oracle scorer whose optimum is known: for testing search and for ceilings in studies.

`ToyPolicy` writes each step line right with probability `p_correct`, otherwise one of `branching - 1` wrong
results (right + j mod M, j = 1..branching-1), then the answer line from the value it carried. Its randomness is
per row (`row_keys`), so a row's sample never depends on the rest of the batch: batched search equals per-problem
search exactly. With `cover=True` the option of row slot s is (s + offset) mod branching (one random offset per
problem and depth), so any `branching` consecutive slots hold every option, the right one included.

`OracleScorer` scores each line with its gold label (1 = the trace is still on the gold path): a perfect PRM.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from framework.search import revision
from framework.search.policy import Extension, check_extend_args
from framework.tasks import arithmetic
from framework.verifiers import labels, traces
from framework.verifiers.model import Scores


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(repr(key).encode())])


class ToyPolicy:
    """Writes the gold step with probability `p_correct`, else a wrong result; per-row random streams."""

    num_params = 0

    def __init__(self, p_correct: float = 0.6, *, branching: int = 4, cover: bool = False):
        if not 0.0 <= p_correct <= 1.0:
            raise ValueError(f"ToyPolicy: p_correct must be in [0, 1], got {p_correct}")
        if isinstance(branching, bool) or not isinstance(branching, int) or branching < 2:
            raise ValueError(f"ToyPolicy: branching must be an int >= 2, got {branching!r}")
        self.p_correct, self.branching, self.cover = float(p_correct), branching, cover

    def _line(self, problem: arithmetic.Problem, prefix: str, key: tuple, greedy: bool) -> str:
        prefix = revision.resolve(prefix)  # retracted lines ("!" markers) are not part of the trace
        lines = traces.split_lines(prefix)
        i = len(lines)
        written = arithmetic.check_solution(problem, prefix).values_written
        carried = problem.start if not written else written[-1]
        carried = 0 if carried is None else carried
        w, m = problem.width, problem.modulus
        if i >= problem.num_steps:
            ans = carried if problem.answer_mod is None else carried % problem.answer_mod
            return f"A {str(ans).zfill(w)}\n"
        op, b = problem.ops[i], problem.operands[i]
        right = arithmetic.apply_op(carried, op, b, m)
        if greedy:
            option = 0
        elif self.cover:
            seed, uid, depth, _, slot = key[:5]
            option = (slot + int(_rng(seed, uid, depth, "offset").integers(self.branching))) % self.branching
        else:
            r = _rng(*key, i)
            option = 0 if r.random() < self.p_correct else int(r.integers(1, self.branching))
        c = (right + option) % m
        return f"{str(carried).zfill(w)}{op}{str(b).zfill(w)}={str(c).zfill(w)}\n"

    def extend(
        self,
        problems: Sequence[arithmetic.Problem],
        prefixes: Sequence[str],
        *,
        until: str,
        greedy: bool = False,
        row_keys: Sequence[tuple] | None = None,
        call_key: tuple = (0,),
    ) -> Extension:
        """One line (or lines up to the answer) per row, drawn from the row's own key."""
        check_extend_args(problems, prefixes, until)
        if row_keys is None:
            row_keys = [(tuple(call_key), 0, 0, 0, i) for i in range(len(problems))]
        texts = []
        for p, x, key in zip(problems, prefixes, row_keys):
            new = self._line(p, x, tuple(key), greedy)
            if until == "answer":
                while not traces.is_answer_line(new.split("\n")[-2]):
                    new += self._line(p, x + new, tuple(key) + (len(new),), greedy)
            texts.append(new)
        n = np.asarray([len(t) for t in texts], np.int64)
        return Extension(texts, n, np.asarray([len(x) for x in prefixes], np.int64))


class OracleScorer:
    """A perfect PRM: each line's score is its gold label (on the gold path so far)."""

    num_params = 0

    def score(self, problems: Sequence[arithmetic.Problem], completions: Sequence[str]) -> Scores:
        s = [labels.gold_labels(p, c).astype(np.float64) for p, c in zip(problems, completions)]
        return Scores(s, np.asarray([len(c) for c in completions], np.int64))
