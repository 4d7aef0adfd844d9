"""An oracle PRM: line scores from the exact checker, optionally blurred by noise of a set size.

Glossary: L lines of a trace.

`OracleVerifier` scores line j of a trace with its gold label (`labels.gold_labels`: 1 while the trace is still on
the gold path) and plugs into search wherever a trained `Verifier` does (`score(problems, completions) -> Scores`).
It is the top of the PRM-quality axis of a test-time scaling study: with `noise=0` the top-scored sample of a pool is
on the gold path whenever one is, so weighted best-of-N and beam search reach the gold-path ceiling
(`framework.search.diagnostics`). With `noise > 0` a line's score is sigmoid(margin * (2y - 1) + noise * z), z a
standard normal drawn from a hash of (seed, prompt, the trace up to and including that line): the same prefix always
gets the same score (as from a real model), and step AUROC falls from 1 towards 0.5 as noise grows
(Phi(sqrt(2) * margin / noise) for Gaussian z).

Its compute is priced as the PRM it stands in for: given `cfg` (an `LMConfig`), `SearchResults.flops` charges each
scored trace `lm.flops(cfg, tokens, 0)` exactly as for a trained `Verifier` of that config; tokens read are counted as
the trained verifier counts them (prompt plus completion).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from framework.models import lm
from framework.tasks import arithmetic, data
from framework.tasks import tokenizer as tok
from framework.verifiers import traces
from framework.verifiers.labels import gold_labels
from framework.verifiers.model import Scores


def _unit_normal(seed: int, prompt: str, prefix: str) -> float:
    """A standard normal draw that depends only on (seed, prompt, prefix)."""
    h = hashlib.blake2b(repr((seed, prompt, prefix)).encode(), digest_size=8).digest()
    return float(np.random.default_rng(int.from_bytes(h, "little")).standard_normal())


class OracleVerifier:
    """A PRM whose line scores are the checker's gold labels, with optional per-line noise (see the module doc)."""

    def __init__(
        self, cfg: lm.LMConfig | Mapping[str, Any] | None = None, *, noise: float = 0.0, margin: float = 4.0, seed=0
    ):
        for name, v in (("noise", noise), ("margin", margin)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"OracleVerifier: {name} must be a finite number >= 0, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"OracleVerifier: seed must be an int >= 0, got {seed!r}")
        if noise > 0 and margin == 0:
            raise ValueError("OracleVerifier: margin must be > 0 when noise > 0 (scores would ignore the labels)")
        self.cfg = None if cfg is None else lm.LMConfig.from_config(cfg)
        self.noise, self.margin, self.seed = float(noise), float(margin), int(seed)

    @property
    def num_params(self) -> int:
        """The parameter count of the PRM it is priced as (0 without `cfg`)."""
        return 0 if self.cfg is None else lm.param_count(self.cfg) + self.cfg.d_model + 1

    def score(self, problems: Sequence[arithmetic.Problem], completions: Sequence[str]) -> Scores:
        """One score per finished line of every completion (gold label, or its noisy logistic version)."""
        if len(problems) != len(completions):
            raise ValueError(f"OracleVerifier.score: {len(problems)} problems but {len(completions)} completions")
        out = []
        for p, c in zip(problems, completions):
            y_L = gold_labels(p, c).astype(np.float64)
            if self.noise > 0:
                prompt = arithmetic.format_prompt(p)
                lines = traces.split_lines(traces.truncate_after_answer(c))
                z_L = np.asarray(
                    [_unit_normal(self.seed, prompt, "\n".join(lines[: j + 1])) for j in range(len(y_L))], np.float64
                )
                y_L = 1.0 / (1.0 + np.exp(-(self.margin * (2 * y_L - 1) + self.noise * z_L)))
            out.append(y_L)
        tokens = np.asarray([len(data.encode_prompt(p)) + len(tok.encode(c)) for p, c in zip(problems, completions)])
        return Scores(out, tokens.astype(np.int64))
