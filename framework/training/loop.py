"""The generic training loop every experiment uses: a `Task` (params, loss, batches) trained under `config.train`.

The experiment parses its config once (`settings.RunSettings.from_config`) and passes the typed settings here.

Params and optimizer state are created directly in their shardings (jit with out_shardings); the step is jitted
with explicit in/out shardings and donates the old state. Batch i is a pure function of (seed, i), so a restored
step is an exact data position and a resumed run continues the same loss curve. Updates whose loss or gradients
are not finite are never applied: `train.nonfinite="stop"` (default) raises naming the first such step before any
further checkpoint is written; `"skip"` counts them and goes on.

What a task can ask for beyond params, loss and batches:
- Frozen param groups: `Task.param_labels` (a label per param leaf), `Task.label_settings` (label -> None, frozen,
  or per-label overrides of lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2) and `config.train.frozen`
  (regexes over '/'-joined param paths, e.g. `('.*embed.*',)`). Frozen params get no gradient, no update, no weight
  decay and no optimizer moments (`optim.labelled_optimizer`); they stay in the state, bitwise unchanged. Without
  labels, regexes or settings the optimizer is `optim.make_optimizer(config.train)`; `Task.optimizer` replaces it.
- Frozen inputs: `Task.frozen`, a pytree (a reference model, a frozen base under adapters, cached activations)
  passed as the loss's third argument, `loss_fn(params, batch, frozen)`. It is placed once (sharded by
  `Task.frozen_logical_axes`, else replicated), never differentiated (outside `value_and_grad`, under
  stop_gradient), never updated, not in the optimizer state and not checkpointed: it is an input, which the task
  re-creates when a rerun resumes (a checksum in the checkpoint record warns if it differs).
- Hooks: the periodic work (eval and `train.stop_when`, metrics and progress, pre-emption, checkpoints) is a list
  of hooks run after every step, `for h in hooks: h(step, ctx)` (`framework.training.hooks`); `Task.hooks` and
  `train(..., hooks=...)` add the user's, e.g. `every(100, write_sample)`.
- Metrics: every scalar of the loss's aux is logged (its mean over the log window) as `train/<name>`; see
  `hooks.Report` for the token counts. An aux entry that is not a scalar, or takes the name of one of the loop's
  own metrics (`hooks.RESERVED`), is a ValueError when the step is traced: reduce it in the loss or rename it.

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

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from framework import config as config_lib
from framework import sharding
from framework.training import checkpoint, optim
from framework.training import settings as settings_lib
from framework.training.checkpoint import Checkpointer
from framework.training.hooks import (
    RESERVED,
    Checkpoint,
    Context,
    Evaluate,
    Hook,
    Preempted,
    Preemption,
    Report,
    every,
    parse_stop_when,
)
from framework.training.metrics import MetricsWriter
from framework.training.settings import RunSettings, config_digest
from framework.training.state import TrainState

__all__ = [
    "Context",
    "Hook",
    "LossFn",
    "Preempted",
    "RunSettings",
    "Task",
    "config_digest",
    "every",
    "init_train_state",
    "jit_train_step",
    "make_train_step",
    "parse_stop_when",
    "sharded_state",
    "task_optimizer",
    "train",
    "truncate_metrics",
    "write_config",
]

log = logging.getLogger(__name__)

# optax >= 0.2.5 spells it optax.tree.norm (global_norm is deprecated there).
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm

# (params, batch) -> (loss, aux), or (params, batch, frozen) -> (loss, aux) for a task with frozen inputs.
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Task:
    """What an experiment hands the loop: how to make params, score a batch, and where batches come from; optionally
    its optimiser or param groups, frozen inputs and hooks (see the module docstring)."""

    init_params: Callable[[jax.Array], Any]  # rng -> params (the tree the state holds and the optimizer updates)
    logical_axes: Any  # PartitionSpec tree (logical names) mirroring params
    loss_fn: LossFn  # (params, batch) -> (loss, aux metrics); (params, batch, frozen) when `frozen` is given
    # start_step -> iterator of host batches. Under several processes it is called as batches(start, rows=(lo, hi))
    # and must yield only rows lo..hi-1 of each global batch (this process's shard).
    batches: Callable[..., Iterable[Mapping[str, np.ndarray]]]
    flops_per_example: float = 0.0  # training FLOPs of one batch row (for MFU)
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None
    # Replaces optim.make_optimizer(config.train) for the trainable params; lr_schedule is what is logged as "lr"
    # (default: the config's schedule, or none when `optimizer` is given without one).
    optimizer: optax.GradientTransformation | None = None
    lr_schedule: optax.Schedule | None = None
    # params -> a tree of str labels of the params' structure (called on their shapes: label by path); labels in
    # label_settings map to None (frozen) or overrides of config.train (optim.LABEL_KEYS). "frozen" is frozen.
    param_labels: Callable[[Any], Any] | None = None
    label_settings: Mapping[str, Mapping[str, Any] | None] = dataclasses.field(default_factory=dict)
    frozen: Any = None  # frozen inputs: the loss's third argument, never differentiated, updated or checkpointed
    frozen_logical_axes: Any = None  # PartitionSpec tree mirroring `frozen`; None = replicated
    hooks: Sequence[Hook] = ()  # hook(step, ctx), run after the eval hook every step


def write_config(config: ml_collections.ConfigDict | settings_lib.RunSettings, workdir: str) -> None:
    """Writes `workdir/config.json` (process 0 only): the experiment's whole config as it was parsed."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        text = config.config_json if isinstance(config, settings_lib.RunSettings) else config_lib.to_json(config)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(text)


def _check_aux(aux) -> None:
    """Aux metrics are logged by name: each must be a scalar and not take a name the loop's own metrics use."""
    if not isinstance(aux, Mapping):
        raise ValueError(f"the loss must return (loss, aux) with aux a dict of scalars; aux is {type(aux).__name__}")
    for k, v in aux.items():
        if k in RESERVED or str(k).startswith("lr/"):
            raise ValueError(f"loss aux metric {k!r} takes the name of a metric the loop logs itself; rename it")
        if jnp.shape(v) != ():
            raise ValueError(
                f"loss aux metric {k!r} has shape {jnp.shape(v)}: aux entries are logged as scalars, reduce it in "
                "the loss (e.g. jnp.mean) or leave it out"
            )


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | Mapping[str, optax.Schedule] | None,
    *,
    trainable=None,
    with_frozen: bool = False,
):
    """The (un-jitted) train step `(state, batch[, frozen]) -> (state, metrics)`; non-finite updates are not applied.

    `schedule`: logged as "lr" (or a dict name -> schedule; None logs none). `trainable`: a bool per param leaf
    (None: all train); frozen leaves get zero gradients and keep their values bitwise. `with_frozen`: the step takes
    the frozen inputs as a third argument and passes them to the loss, without differentiating them.
    """
    schedules = {} if schedule is None else dict(schedule) if isinstance(schedule, Mapping) else {"lr": schedule}

    def step_fn(state: TrainState, batch, frozen=None):
        if with_frozen:
            frozen = jax.lax.stop_gradient(frozen)
            (loss, aux), grads = jax.value_and_grad(lambda p: loss_fn(p, batch, frozen), has_aux=True)(state.params)
        else:
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        _check_aux(aux)
        if trainable is not None:  # static zeros: XLA drops the frozen weights' gradient computations
            grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if trainable is not None:  # p + 0 would turn -0.0 into 0.0: frozen leaves keep their very bits
            params = jax.tree.map(lambda new, old, t: new if t else old, params, state.params, trainable)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where(~finite & (state.first_nonfinite < 0), state.step, state.first_nonfinite),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, **{k: s(state.step) for k, s in schedules.items()}, **aux}
        return new_state, metrics

    if with_frozen:
        return step_fn
    return lambda state, batch: step_fn(state, batch)


def truncate_metrics(workdir: str, step: int) -> None:
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


def _opt_shardings(opt_state, params, param_shardings, replicated):
    """A leaf of the optimizer state whose key path ends in a param's path (and has its shape) shards like that param
    (Adam's moments, whatever transforms wrap them); anything else (counts, scalars) is replicated."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    by_path = {tuple(p): (x.shape, s) for (p, x), s in zip(flat, jax.tree.leaves(param_shardings))}

    def pick(path, x):
        for i in range(len(path) + 1):
            hit = by_path.get(tuple(path[i:]))
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def sharded_state(task: Task, tx: optax.GradientTransformation, mesh, rules, rng: jax.Array):
    """(init, abstract state, state shardings): `init(rng)` creates the step-0 TrainState directly in its shardings.

    Params follow the rules table; optimizer moments mirror their params; counts and scalars are replicated.
    """

    def init_state(rng):
        return init_train_state(task.init_params(rng), tx, rng)

    abstract = jax.eval_shape(init_state, rng)
    param_shardings = sharding.tree_shardings(task.logical_axes, abstract.params, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=_opt_shardings(abstract.opt_state, abstract.params, param_shardings, replicated),
        rng=replicated,
        nonfinite_steps=replicated,
        first_nonfinite=replicated,
    )
    return jax.jit(init_state, out_shardings=state_shardings), abstract, state_shardings


def _hashable(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return tuple(leaves), treedef


_STEP_CACHE: collections.OrderedDict = collections.OrderedDict()  # jitted steps, so repeated trainings share compiles


def jit_train_step(
    task: Task, tx, schedule, state_shardings: TrainState, batch_shardings, *, trainable=None, frozen_shardings=None
):
    """The train step jitted with explicit in/out shardings (metrics replicated) and the old state donated.

    With `task.frozen` it takes the frozen inputs as a third argument (in `frozen_shardings`, default replicated).
    The jitted function is reused for the same loss, optimizer, schedule, groups and shardings (a task trained
    several times, e.g. `verifiers.fit`, compiles once).
    """
    with_frozen = task.frozen is not None
    if with_frozen and frozen_shardings is None:
        frozen_shardings = jax.tree.map(lambda _: state_shardings.step, task.frozen)
    key = (
        task.loss_fn,
        tx,
        tuple(schedule.items()) if isinstance(schedule, Mapping) else schedule,
        *map(_hashable, (trainable, state_shardings, batch_shardings, frozen_shardings if with_frozen else None)),
    )
    if key in _STEP_CACHE:
        _STEP_CACHE.move_to_end(key)
        return _STEP_CACHE[key]
    step = make_train_step(task.loss_fn, tx, schedule, trainable=trainable, with_frozen=with_frozen)
    shardings = (state_shardings, batch_shardings) + ((frozen_shardings,) if with_frozen else ())
    out_shardings = (state_shardings, state_shardings.step)
    _STEP_CACHE[key] = jax.jit(step, in_shardings=shardings, out_shardings=out_shardings, donate_argnums=0)
    while len(_STEP_CACHE) > 8:
        _STEP_CACHE.popitem(last=False)
    return _STEP_CACHE[key]


def task_optimizer(tc, task: Task, params) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule], Any]:
    """(optimizer, schedules logged by name, trainable mask or None) for `task` under `config.train`.

    `params` may be abstract (the labels are computed from paths and shapes). No labels, regexes or settings: the
    config's `make_optimizer` (or `task.optimizer`) with no mask, exactly as for a task that sets none of them.
    """
    patterns = tuple(tc.get("frozen", ()) or ())
    settings = dict(task.label_settings or {})
    default = task.lr_schedule or (optim.lr_schedule(tc) if task.optimizer is None else None)
    schedules = {"lr": default} if default is not None else {}
    if task.param_labels is None and not patterns and not settings:
        return task.optimizer if task.optimizer is not None else optim.make_optimizer(tc), schedules, None
    labels = optim.param_labels(params, label_fn=task.param_labels, frozen=patterns)
    tx = optim.labelled_optimizer(tc, labels, settings, optimizer=task.optimizer)
    if task.optimizer is None:
        schedules.update(optim.label_schedules(tc, labels, settings))
    return tx, schedules, optim.trainable_mask(labels, settings)


def _place_frozen(task: Task, mesh, rules):
    """(frozen inputs on the mesh, their shardings, a checksum of them) or (None, None, None)."""
    if task.frozen is None:
        return None, None, None
    shapes = jax.eval_shape(lambda: task.frozen)
    if task.frozen_logical_axes is None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings = jax.tree.map(lambda _: replicated, shapes)
    else:
        shardings = sharding.tree_shardings(task.frozen_logical_axes, shapes, mesh, rules)
    frozen = jax.device_put(task.frozen, shardings)
    digest = hashlib.sha256(json.dumps(checkpoint.checksums(frozen)).encode()).hexdigest()[:16]
    return frozen, shardings, digest


def _checkpointer(workdir: str, tc) -> Checkpointer:
    return Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=tc.keep_checkpoints,
        keep_every=tc.get("keep_checkpoint_every", 0),
        async_save=tc.get("async_checkpoint", True),
    )


def _restore(ckpt: Checkpointer, abstract: TrainState, shardings: TrainState, meta: dict, workdir: str, tc):
    """(restored state or None, the step to train to): the newest good checkpoint, with warnings where it was written
    under another config or other frozen inputs, or where it met `train.stop_when` already."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = ckpt.restore_latest(target)
    if restored is None:
        # No usable checkpoint: training starts over, so records a killed earlier attempt logged are stale.
        truncate_metrics(workdir, -1)
        return None, tc.steps
    state, saved = restored
    for key, what in (("config_digest", "a different config"), ("frozen_checksum", "other frozen inputs")):
        if key in meta and saved.get(key) != meta[key]:
            log.warning(
                "resuming from a checkpoint written under %s (%s %s, now %s)", what, key, saved.get(key), meta[key]
            )
    truncate_metrics(workdir, int(state.step))
    log.info("resumed from step %d in %s", int(state.step), ckpt.directory)
    _warn_schedule_change(saved.get("train_steps"), tc, int(state.step))
    stopped = saved.get("stopped_early")
    if stopped and stopped.get("criterion") == tc.get("stop_when", ""):
        log.warning(
            "step %d met train.stop_when %r (%s = %.6g) in an earlier run: not training further",
            int(state.step),
            stopped["criterion"],
            parse_stop_when(stopped["criterion"])[0],
            stopped["value"],
        )
        return state, int(state.step)
    return state, tc.steps


def _warn_schedule_change(saved_steps: int | None, tc, step: int) -> None:
    """Warns when a resumed run's `train.steps` differs from the one its checkpoint trained toward: the config's
    learning-rate schedule spans `train.steps`, so from the resumed step on it follows the new span."""
    if saved_steps is None or int(saved_steps) == int(tc.steps) or step >= int(tc.steps):
        return
    was = float(optim.lr_schedule({**tc, "steps": int(saved_steps)})(step)) if "warmup_steps" in tc else None
    now = float(optim.lr_schedule(tc)(step)) if "warmup_steps" in tc else None
    lr = f" (the config's schedule gives lr {was:.4g} at step {step} for {saved_steps} steps, {now:.4g} for {tc.steps})"
    log.warning(
        "train.steps changed from %d to %d since the checkpoint at step %d: the learning-rate schedule, which spans "
        "train.steps, is re-shaped from here on%s; keep train.steps=%d to continue the original schedule",
        int(saved_steps),
        int(tc.steps),
        step,
        lr if was is not None else "",
        int(saved_steps),
    )


def _batches(task: Task, mesh, rules, tc, start: int):
    """(the task's batch iterator from `start`, whether it yields only this process's rows)."""
    if jax.process_count() == 1:
        return task.batches(start), False
    lo, hi = sharding.process_rows(mesh, tc.batch_size, rules)  # each process loads only the rows its devices hold
    log.warning(
        "process %d/%d loads rows [%d, %d) of each global batch of %d",
        jax.process_index(),
        jax.process_count(),
        lo,
        hi,
        tc.batch_size,
    )
    return task.batches(start, rows=(lo, hi)), True


def train(
    run: settings_lib.RunSettings | ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    *,
    devices=None,
    hooks: Sequence[Hook] = (),
) -> TrainState:
    """Trains `task` under `run.train`/`run.mesh` in `workdir`, resuming from its latest good checkpoint.

    `run` is the experiment's parsed settings (`RunSettings.from_config(config)`; a ConfigDict is parsed here, once).
    `devices` (default: all) are the devices the mesh spans; `hooks` run after the task's own. Raises `Preempted`
    after checkpointing on SIGTERM.
    """
    run = settings_lib.RunSettings.from_config(run)
    tc = run.train
    evaluate = Evaluate(task.eval_fn, tc)  # validates train.stop_when before anything is built
    write_config(run, workdir)
    mesh, rules = sharding.make_mesh(run.mesh, devices), sharding.rules_from_config(run.mesh)
    rng = jax.random.key(run.seed)
    tx, schedules, trainable = task_optimizer(tc, task, jax.eval_shape(task.init_params, rng))
    init_state, abstract, state_shardings = sharded_state(task, tx, mesh, rules, rng)
    for line in sharding.unsplit_dims(task.logical_axes, abstract.params, mesh, rules):
        log.warning("sharding: %s", line)
    frozen, frozen_shardings, frozen_sum = _place_frozen(task, mesh, rules)
    meta = {"config_digest": run.digest, "train_steps": int(tc.steps)}
    meta |= {"frozen_checksum": frozen_sum} if frozen_sum else {}
    ckpt = _checkpointer(workdir, tc)
    state, last = _restore(ckpt, abstract, state_shardings, meta, workdir, tc)
    state = init_state(rng) if state is None else state
    start, writer, extra = int(state.step), MetricsWriter(workdir), () if frozen is None else (frozen,)
    batches, multi = _batches(task, mesh, rules, tc, start)
    ctx, saver = Context(run, workdir, writer, last=tc.steps), Checkpoint(ckpt, tc, meta, start)
    hooks = [evaluate, Preemption(), *task.hooks, *hooks, Report(tc, start, task.flops_per_example), saver]
    # The step is jitted at the first batch, once its keys and ranks (hence its shardings) are known.
    jit_step = functools.partial(
        jit_train_step, task, tx, schedules, state_shardings, trainable=trainable, frozen_shardings=frozen_shardings
    )
    step_fn = None
    try:
        with sharding.rules_context(mesh, rules):
            for step, batch in zip(range(start, last), batches):
                rows = tc.batch_size if multi else int(np.shape(next(iter(batch.values())))[0])
                batch = sharding.global_batch(batch, mesh, rows, rules)
                step_fn = step_fn or jit_step({k: v.sharding for k, v in batch.items()})
                state, metrics = step_fn(state, batch, *extra)
                ctx.next_step(step + 1, state, metrics, rows)
                for h in hooks:
                    h(step + 1, ctx)
                if ctx.stop:
                    break
        if ctx.stop == "preempted":
            ckpt.wait()
            log.warning("SIGTERM: stopped after step %d and checkpointed it in %s", saver.saved, ckpt.directory)
            raise Preempted(saver.saved)
    finally:
        for h in hooks:
            getattr(h, "close", lambda: None)()
        ckpt.close()
        writer.close()
    return state
