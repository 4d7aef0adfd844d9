"""The training loop's periodic work as hooks: evaluation and early stopping, metrics and progress, pre-emption,
checkpoints, and the user's own (`every(n, fn)`).

A hook is `hook(step, ctx)`, called after every train step on every process, with `step` the number of steps done
(the state's step) and `ctx` a `Context`: the state, this step's metrics, the config, the metrics writer, and two
fields hooks set for later ones: `evaluated` (this step's eval metrics) and `stop` (a reason to end the run after
this step, which the checkpoint hook then saves). The loop runs, in order: `Evaluate`, `Preemption`, the task's and
the caller's hooks, `Report`, `Checkpoint`: every hook after the first two knows whether the run stops at this step,
so the metrics of a pre-empted run's last steps are written and `every(..., at_end=True)` hooks run there.

Metrics: `Report` logs the mean over its window of every scalar the step returns (loss, grad_norm, lr, and every
entry of the loss's aux) as `train/<name>`. `tokens` and `correct` are counts (as `next_token_loss` returns them):
they are summed into `token_accuracy` and `target_tokens_per_s` instead of averaged; `loss_sum` (a sum, redundant with
`loss`) is not logged.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from framework import config as config_lib
from framework.training.checkpoint import Checkpointer
from framework.training.metrics import MetricsWriter
from framework.training.settings import RunSettings
from framework.training.state import TrainState

log = logging.getLogger("framework.training.loop")  # the loop's logger: its warnings read as the loop's

COUNTS = ("tokens", "correct", "loss_sum")  # aux counts: summed into derived metrics, never averaged
# Names the loop's own metrics use: an aux entry may not take one.
RESERVED = (
    "loss",
    "grad_norm",
    "lr",
    "token_accuracy",
    "step_time_s",
    "rows_per_s",
    "target_tokens_per_s",
    "model_tflops_per_s",
    "mfu",
    "nonfinite_steps",
)


class Preempted(Exception):
    """Training stopped on SIGTERM after checkpointing `step`; rerunning the same command resumes there."""

    def __init__(self, step: int):
        super().__init__(f"pre-empted (SIGTERM): checkpointed step {step}; rerun the same command to resume")
        self.step = step


@dataclasses.dataclass
class Context:
    """What every hook sees after a step; `evaluated`, `stop` and `meta` are set by hooks for the ones after them."""

    config: RunSettings  # the run's parsed seed, train and mesh settings
    workdir: str
    writer: MetricsWriter
    last: int  # the step the run ends at (config.train.steps)
    step: int = 0  # steps done
    rows: int = 0  # global batch rows of this step
    state: TrainState | None = None
    metrics: dict[str, jax.Array] | None = None  # this step's metrics (device arrays: reading one waits for it)
    evaluated: dict[str, float] | None = None  # the eval's metrics, at the steps it runs
    stop: str | None = None  # set to a reason to end the run after this step (checkpointed; a rerun trains on)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra entries of this step's checkpoint record
    untimed_s: float = 0.0  # seconds hooks spent this step, kept out of step_time_s

    @property
    def final(self) -> bool:
        return self.step == self.last

    def next_step(self, step: int, state: TrainState, metrics, rows: int) -> None:
        self.step, self.state, self.metrics, self.rows = step, state, metrics, rows
        self.evaluated, self.untimed_s, self.meta = None, 0.0, {}


Hook = Callable[[int, Context], None]


def _untimed(fn: Hook, step: int, ctx: Context) -> None:
    """Runs `fn(step, ctx)` once the state is computed, its time kept out of the step timings."""
    jax.block_until_ready(ctx.state)
    t0 = time.perf_counter()
    fn(step, ctx)
    ctx.untimed_s += time.perf_counter() - t0


class every:  # a class named like the function it reads as: loop.every(100, fn)
    """A hook running `fn(step, ctx)` every `n` steps (and, if `at_end`, at the run's last step: the final one or one
    where the run stops early), after the state is computed; its time stays out of the step timings."""

    def __init__(self, n: int, fn: Hook, *, at_end: bool = True):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"every: n must be an int >= 1, got {n!r}")
        self.n, self.fn, self.at_end = n, fn, at_end

    def __call__(self, step: int, ctx: Context) -> None:
        if step % self.n == 0 or (self.at_end and (ctx.final or ctx.stop is not None)):
            _untimed(self.fn, step, ctx)


_STOP_WHEN = re.compile(r"^\s*(?:eval/)?([A-Za-z_][\w/]*)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_stop_when(spec: str) -> tuple[str, str, float] | None:
    """`train.stop_when`: "" (off) or "<eval metric> >= <x>" / "<eval metric> <= <x>" -> (metric, op, x).

    Raises ConfigError naming the key for anything else.
    """
    if not spec:
        return None
    m = _STOP_WHEN.match(spec)
    if m is None:
        raise config_lib.ConfigError(
            f"config key 'train.stop_when': {spec!r} is not '<eval metric> >= <number>' or '<eval metric> <= <number>'"
            " (e.g. 'token_accuracy>=0.98'; '' turns early stopping off)"
        )
    return m.group(1), m.group(2), float(m.group(3))


def _criterion_met(criterion: tuple[str, str, float], metrics: Mapping[str, float]) -> bool:
    key, op, x = criterion
    if key not in metrics:
        raise config_lib.ConfigError(
            f"config key 'train.stop_when': the eval returns no metric {key!r}; it returns {sorted(metrics)}"
        )
    value = float(metrics[key])
    return value >= x if op == ">=" else value <= x


def check_finite(state: TrainState, policy: str) -> None:
    """Raises FloatingPointError naming the first non-finite step if there was one and `policy` is "stop"."""
    first = int(state.first_nonfinite)
    if first >= 0 and policy == "stop":
        raise FloatingPointError(
            f"non-finite loss or gradients at step {first}; the update was not applied and no checkpoint holds it. "
            "Lower train.lr, or set train.nonfinite='skip' to skip such updates."
        )


class Evaluate:
    """Runs `eval_fn(state)` every `eval_every` steps and at the end (0: only at the end); with `train.stop_when`,
    stops the run at the first evaluation meeting it and records the criterion in the checkpoint."""

    def __init__(self, eval_fn, tc):
        self.criterion = parse_stop_when(tc.get("stop_when", ""))
        if self.criterion and not (eval_fn and tc.eval_every):
            raise config_lib.ConfigError(
                "config key 'train.stop_when': early stopping needs periodic evaluation (train.eval_every > 0 and a "
                f"task with an eval), got eval_every={tc.eval_every}"
            )
        self.eval_fn, self.tc = eval_fn, tc

    def _evaluate(self, step: int, ctx: Context) -> None:
        ctx.evaluated = dict(self.eval_fn(ctx.state))
        if self.criterion and not ctx.final and _criterion_met(self.criterion, ctx.evaluated):
            value = float(ctx.evaluated[self.criterion[0]])
            ctx.stop, ctx.meta["stopped_early"] = "stop_when", {"criterion": self.tc.stop_when, "value": value}
            log.info(
                "step %d meets train.stop_when %r (%s = %.6g): stopping early",
                step,
                self.tc.stop_when,
                self.criterion[0],
                value,
            )

    def __call__(self, step: int, ctx: Context) -> None:
        every_n = self.tc.eval_every  # 0: only at the end
        if self.eval_fn is not None and (ctx.final or (every_n and step % every_n == 0)):
            _untimed(self._evaluate, step, ctx)


def _interactive() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class Report:
    """Train metrics every `log_every` steps (and at the end, or when the run stops) and the eval's, to metrics.jsonl
    and TensorBoard; the progress bar. Throughput, step time and MFU leave out the run's first (compiling) step."""

    def __init__(self, tc, start: int, flops_per_example: float = 0.0):
        self.tc, self.flops_per_example = tc, flops_per_example
        # acc: step metrics since the last log; the last `timed` of them, `window` rows, ran since t0.
        self.acc, self.timed, self.window, self.t0 = [], 0, 0, None
        # Off a terminal (a log file, a CI job) a redrawn bar is one endless line: print a short line per log instead
        # (a notebook draws tqdm's widget).
        self.lines = bool(tc.progress) and jax.process_index() == 0 and not _interactive()
        self.bar = tqdm(
            total=tc.steps,
            initial=start,
            disable=not tc.progress or jax.process_index() != 0 or self.lines,
            desc="train",
            dynamic_ncols=True,
        )

    def __call__(self, step: int, ctx: Context) -> None:
        self.acc.append(ctx.metrics)
        if self.t0 is None:  # the first step compiles: its metrics count, its time does not
            jax.block_until_ready(ctx.metrics)
            self.t0 = time.perf_counter()
        else:
            self.timed, self.window = self.timed + 1, self.window + ctx.rows
            self.t0 += ctx.untimed_s
        if step % self.tc.log_every == 0 or ctx.final or ctx.stop is not None:
            check_finite(ctx.state, self.tc.nonfinite)
            seconds = time.perf_counter() - self.t0
            history = jax.device_get(self.acc)
            logged = summarise(history, self.timed, self.window, seconds, self.flops_per_example, self.tc.peak_flops)
            logged["nonfinite_steps"] = int(ctx.state.nonfinite_steps)
            ctx.writer.write(step, logged, prefix="train/")
            self.bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.4f}")
            if self.lines:
                print(f"train step {step}/{self.tc.steps} loss {logged.get('loss', float('nan')):.4f}", file=sys.stderr)
            self.acc, self.timed, self.window, self.t0 = [], 0, 0, time.perf_counter()
        if ctx.evaluated is not None:
            ctx.writer.write(step, ctx.evaluated, prefix="eval/")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def summarise(
    history, timed: int, rows: int, seconds: float, flops_per_example: float = 0.0, peak_flops: float | None = None
) -> dict[str, float]:
    """Means over a logging window of every step metric but the counts; token accuracy from the counts; throughput,
    step time, model FLOP/s and MFU from its last `timed` steps (`rows` examples in `seconds`)."""
    if not history:
        return {}
    out = {k: float(np.mean([h[k] for h in history])) for k in history[0] if k not in COUNTS}
    # Token counts are optional aux metrics (next_token_loss has them; a task scoring no tokens has not).
    has_tokens = "tokens" in history[0]
    if has_tokens and "correct" in history[0]:
        tokens = sum(float(h["tokens"]) for h in history)
        out["token_accuracy"] = sum(float(h["correct"]) for h in history) / max(tokens, 1.0)
    if seconds > 0 and rows and timed:
        out["step_time_s"] = seconds / timed
        out["rows_per_s"] = rows / seconds  # batch rows (a packed row holds several examples)
        if has_tokens:
            out["target_tokens_per_s"] = sum(float(h["tokens"]) for h in history[len(history) - timed :]) / seconds
        if flops_per_example:
            flops = flops_per_example * rows / seconds
            out["model_tflops_per_s"] = flops / 1e12
            if peak_flops:
                out["mfu"] = flops / peak_flops
    return out


class Preemption:
    """Notices SIGTERM and stops the run after the current step (which `Checkpoint` then saves). One process installs
    a handler that sets a flag; several processes agree on the step to stop at through JAX's preemption sync point
    (the coordination service notices the signal on every host)."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def requested(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()

    def __call__(self, step: int, ctx: Context) -> None:
        if self.requested(step) and not ctx.final and ctx.stop is None:  # asked every step: a multi-host sync point
            ctx.stop = "preempted"

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Checkpoint:
    """Saves the state every `checkpoint_every` steps, at the end and when the run stops (refusing non-finite
    updates under `train.nonfinite="stop"`); the record holds the config digest and the hooks' `meta`."""

    def __init__(self, ckpt: Checkpointer, tc, meta: Mapping[str, Any], start: int):
        self.ckpt, self.tc, self.meta, self.saved = ckpt, tc, dict(meta), start

    def __call__(self, step: int, ctx: Context) -> None:
        if step % self.tc.checkpoint_every == 0 or ctx.final or ctx.stop:
            check_finite(ctx.state, self.tc.nonfinite)
            self.ckpt.save(ctx.state, meta={**self.meta, **ctx.meta}, force=ctx.final or bool(ctx.stop))
            self.saved = step
