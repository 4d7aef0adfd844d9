"""The generic training loop every experiment uses.

Params and optimizer state are created directly in their shardings (jit with out_shardings); the step is jitted
with explicit in/out shardings and donates the old state. Batch i is a pure function of (seed, i), so a restored
step is an exact data position and a resumed run continues the same loss curve. Updates whose loss or gradients
are not finite are never applied: `train.nonfinite="stop"` (default) raises naming the first such step before any
further checkpoint is written; `"skip"` counts them and goes on.

Scale-out: the mesh and the logical-axis rules come from `config.mesh` (DP, FSDP, TP and FSDP+TP are config
changes). Under several processes (`jax.distributed`) each process loads only its own rows of every global batch
and only process 0 writes config, metrics and logs. Fault tolerance: the newest checkpoint that verifies is
restored (a damaged one is moved aside with a warning); SIGTERM (pre-emption) finishes the current step, writes a
checkpoint and raises `Preempted`, which the launcher turns into exit status 0.

Early stopping: `train.stop_when = "token_accuracy>=0.98"` (any key the task's eval returns, `>=` or `<=`) ends
training at the first evaluation (every `train.eval_every` steps) that meets it, checkpoints that step and records
the criterion in the checkpoint, so rerunning the command does not train further. It pins a run's outcome to a
measured quality instead of a step count, which matters for deliberately partly trained models: how fast a small
model learns varies a lot with the seed (and with the CPU's rounding), what it has learned at a given quality much
less.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from framework import config as config_lib
from framework import sharding
from framework.training import optim
from framework.training.checkpoint import Checkpointer
from framework.training.metrics import MetricsWriter
from framework.training.state import TrainState

log = logging.getLogger(__name__)

# optax >= 0.2.5 spells it optax.tree.norm (global_norm is deprecated there).
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


class Preempted(Exception):
    """Training stopped on SIGTERM after checkpointing `step`; rerunning the same command resumes there."""

    def __init__(self, step: int):
        super().__init__(f"pre-empted (SIGTERM): checkpointed step {step}; rerun the same command to resume")
        self.step = step


class _Preemption:
    """Notices SIGTERM: one process installs a handler that sets a flag; several processes agree on the step to stop
    at through JAX's preemption sync point (the coordination service notices the signal on every host)."""

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

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


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


LossFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Task:
    """What an experiment hands the loop: how to make params, score a batch, and where batches come from."""

    init_params: Callable[[jax.Array], Any]  # rng -> params
    logical_axes: Any  # PartitionSpec tree (logical names) mirroring params
    loss_fn: LossFn  # (params, batch) -> (loss, aux metrics)
    # start_step -> iterator of host batches. Under several processes it is called as batches(start, rows=(lo, hi))
    # and must yield only rows lo..hi-1 of each global batch (this process's shard).
    batches: Callable[..., Iterable[Mapping[str, np.ndarray]]]
    flops_per_example: float = 0.0  # training FLOPs of one batch row (for MFU)
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None


def config_digest(config: ml_collections.ConfigDict) -> str:
    """A short hash of the config, excluding `train.steps` (extending a run is not a different run)."""
    d = config.to_dict()
    d.get("train", {}).pop("steps", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `workdir/config.json` (process 0 only)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """The (un-jitted) train step `(state, batch) -> (state, metrics)`; non-finite updates are not applied."""

    def step_fn(state: TrainState, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where(~finite & (state.first_nonfinite < 0), state.step, state.first_nonfinite),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **aux}
        return new_state, metrics

    return step_fn


def _check_finite(state: TrainState, policy: str) -> None:
    first = int(state.first_nonfinite)
    if first >= 0 and policy == "stop":
        raise FloatingPointError(
            f"non-finite loss or gradients at step {first}; the update was not applied and no checkpoint holds it. "
            "Lower train.lr, or set train.nonfinite='skip' to skip such updates."
        )


def _truncate_metrics(workdir: str, step: int) -> None:
    """Drops metric records past a restored step, so a resumed run's metrics.jsonl reads as one clean curve."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                continue
            if record["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(keep)


def init_train_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A step-0 TrainState around `params` (the state's own RNG is derived from `rng`)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite=jnp.full((), -1, jnp.int32),
    )


def sharded_state(task: Task, tx: optax.GradientTransformation, mesh, rules, rng: jax.Array):
    """(init, abstract state, state shardings): `init(rng)` creates the step-0 TrainState directly in its shardings.

    Params follow the rules table; optimizer moments mirror their params; counts and scalars are replicated.
    """

    def init_state(rng):
        return init_train_state(task.init_params(rng), tx, rng)

    abstract = jax.eval_shape(init_state, rng)
    param_shardings = sharding.tree_shardings(task.logical_axes, abstract.params, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.tree.map(lambda _: replicated, abstract.opt_state),
        param_shardings,
        transform_non_params=lambda s: s,
        is_leaf=lambda x: x is None,
    )
    state_shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        nonfinite_steps=replicated,
        first_nonfinite=replicated,
    )
    return jax.jit(init_state, out_shardings=state_shardings), abstract, state_shardings


def jit_train_step(task: Task, tx, schedule, state_shardings: TrainState, batch_shardings):
    """The train step jitted with explicit in/out shardings (metrics replicated) and the old state donated."""
    return jax.jit(
        make_train_step(task.loss_fn, tx, schedule),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, state_shardings.step),
        donate_argnums=0,
    )


def train(config: ml_collections.ConfigDict, workdir: str, task: Task, *, devices=None) -> TrainState:
    """Trains `task` under `config.train`/`config.mesh` in `workdir`, resuming from its latest good checkpoint.

    `devices` (default: all) are the devices the mesh spans. Raises `Preempted` after checkpointing on SIGTERM.
    """
    tc = config.train
    criterion = parse_stop_when(tc.get("stop_when", ""))
    if criterion and not (task.eval_fn and tc.eval_every):
        raise config_lib.ConfigError(
            "config key 'train.stop_when': early stopping needs periodic evaluation (train.eval_every > 0 and a task "
            f"with an eval), got eval_every={tc.eval_every}"
        )
    write_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.mesh)
    tx, schedule = optim.make_optimizer(tc), optim.lr_schedule(tc)

    rng = jax.random.key(config.seed)
    init_state, abstract, state_shardings = sharded_state(task, tx, mesh, rules, rng)
    for line in sharding.unsplit_dims(task.logical_axes, abstract.params, mesh, rules):
        log.warning("sharding: %s", line)
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=tc.keep_checkpoints,
        keep_every=tc.get("keep_checkpoint_every", 0),
        async_save=tc.get("async_checkpoint", True),
    )
    digest = config_digest(config)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
    restored = ckpt.restore_latest(target)
    last = tc.steps
    if restored is not None:
        state, meta = restored
        if meta.get("config_digest") != digest:
            log.warning(
                "resuming from a checkpoint written under a different config (digest %s, now %s)",
                meta.get("config_digest"),
                digest,
            )
        _truncate_metrics(workdir, int(state.step))
        log.info("resumed from step %d in %s", int(state.step), ckpt.directory)
        stopped = meta.get("stopped_early")
        if stopped and stopped.get("criterion") == tc.get("stop_when", ""):
            log.warning(
                "step %d met train.stop_when %r (%s = %.6g) in an earlier run: not training further",
                int(state.step),
                stopped["criterion"],
                criterion[0],
                stopped["value"],
            )
            last = int(state.step)
    else:
        # No usable checkpoint: training starts over, so records a killed earlier attempt logged are stale.
        _truncate_metrics(workdir, -1)
        state = init_state(rng)

    writer = MetricsWriter(workdir)
    start = int(state.step)
    multi = jax.process_count() > 1
    if multi:  # each process loads only the rows its devices hold
        lo, hi = sharding.process_rows(mesh, tc.batch_size, rules)
        log.warning(
            "process %d/%d loads rows [%d, %d) of each global batch of %d",
            jax.process_index(),
            jax.process_count(),
            lo,
            hi,
            tc.batch_size,
        )
        batches = task.batches(start, rows=(lo, hi))
    else:
        batches = task.batches(start)
    step_fn = None  # jitted at the first batch, once its keys and ranks (hence its shardings) are known
    bar = tqdm(
        total=tc.steps,
        initial=start,
        disable=not tc.progress or jax.process_index() != 0,
        desc="train",
        dynamic_ncols=True,
    )
    # acc: step metrics since the last log (all averaged); the last `timed` of them, `window` rows, ran since t0.
    acc, timed, window, t0 = [], 0, 0, None
    preemption, saved = _Preemption(), start
    try:
        with sharding.rules_context(mesh, rules):
            for step, batch in zip(range(start, last), batches):
                rows = tc.batch_size if multi else int(np.shape(next(iter(batch.values())))[0])
                batch = sharding.global_batch(batch, mesh, rows, rules)
                if step_fn is None:
                    batch_shardings = {k: v.sharding for k, v in batch.items()}
                    step_fn = jit_train_step(task, tx, schedule, state_shardings, batch_shardings)
                state, metrics = step_fn(state, batch)
                acc.append(metrics)
                done = step + 1
                if t0 is None:  # the first step compiles: its metrics count, its time does not
                    jax.block_until_ready(metrics)
                    t0 = time.perf_counter()
                else:
                    timed, window = timed + 1, window + rows
                # eval_every = 0: only at the end (as validated and documented in train_lm).
                evaluate = task.eval_fn and (done == tc.steps or (tc.eval_every and done % tc.eval_every == 0))
                if evaluate:
                    jax.block_until_ready(state)  # the eval's time stays out of the step timings
                    t_eval = time.perf_counter()
                    evaluated = task.eval_fn(state)
                    if t0 is not None:
                        t0 += time.perf_counter() - t_eval
                met = bool(criterion and evaluate and done < tc.steps and _criterion_met(criterion, evaluated))
                if done % tc.log_every == 0 or done == tc.steps or met:
                    _check_finite(state, tc.nonfinite)
                    seconds = time.perf_counter() - t0
                    logged = _summarise(jax.device_get(acc), timed, window, seconds, task, tc)
                    logged["nonfinite_steps"] = int(state.nonfinite_steps)
                    writer.write(done, logged, prefix="train/")
                    bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.4f}")
                    acc, timed, window, t0 = [], 0, 0, time.perf_counter()
                if evaluate:
                    writer.write(done, evaluated, prefix="eval/")
                stop = preemption.requested(done) and done < tc.steps
                save_meta = {"config_digest": digest}
                if met:
                    save_meta["stopped_early"] = {"criterion": tc.stop_when, "value": float(evaluated[criterion[0]])}
                    log.warning(
                        "step %d meets train.stop_when %r (%s = %.6g): stopping early",
                        done,
                        tc.stop_when,
                        criterion[0],
                        save_meta["stopped_early"]["value"],
                    )
                if done % tc.checkpoint_every == 0 or done == tc.steps or stop or met:
                    _check_finite(state, tc.nonfinite)
                    ckpt.save(state, meta=save_meta, force=done == tc.steps or stop or met)
                    saved = done
                bar.update(1)
                if met:
                    break
                if stop:
                    ckpt.wait()
                    log.warning("SIGTERM: stopped after step %d and checkpointed it in %s", saved, ckpt.directory)
                    raise Preempted(saved)
    finally:
        preemption.close()
        bar.close()
        ckpt.close()
        writer.close()
    return state


def _summarise(history, timed: int, rows: int, seconds: float, task: Task, tc) -> dict[str, float]:
    """Averages step metrics over a logging window; throughput, step time and MFU come from its last `timed` steps
    (`rows` examples in `seconds`), which leave out a run's first, compiling step."""
    if not history:
        return {}
    out = {k: float(np.mean([h[k] for h in history])) for k in ("loss", "grad_norm", "lr")}
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
        if task.flops_per_example:
            flops = task.flops_per_example * rows / seconds
            out["model_tflops_per_s"] = flops / 1e12
            if tc.peak_flops:
                out["mfu"] = flops / tc.peak_flops
    return out
