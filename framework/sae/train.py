"""Training SAEs and transcoders: `fit(activations, sae_cfg, *, steps, batch_size, seed) -> (sae_params, metrics)`.

Glossary: S steps per compiled call, B batch rows, D input width, O output width, L latents.

Several training steps run in one compiled call (`lax.scan` over `sae.steps_per_call` batches: the SAE's speed);
around the scan, the bookkeeping is the training loop's (`framework.training.loop`):
- the same orbax `Checkpointer` (whole training state, verified restore, fallback to the previous good checkpoint);
- the same finiteness policy: an update whose loss or gradients are not finite is never applied;
  `nonfinite="stop"` (default) raises naming the first such step before any checkpoint holds it, `"skip"` counts
  such steps (`nonfinite_steps`) and goes on;
- the same `MetricsWriter`: with `metrics_dir`, one `train/` record per `sae.log_every` steps in metrics.jsonl and
  TensorBoard, written as training goes;
- the same resume: the newest verified checkpoint, the metric records past it dropped, and the step is the data
  position, so a resumed run ends with the parameters and history of an uninterrupted one.
With `normalize_inputs`, inputs (and targets) are scaled to mean squared norm d_in during training and the scale is
folded back into the weights at the end, so the returned parameters work on raw activations (the scales are
reported in `metrics["norm_scale_in"|"norm_scale_out"]`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from framework import sharding
from framework.sae import defaults, model
from framework.sae import metrics as metrics_lib
from framework.sae.source import Source, check_finite, iterate_chunks, norm_scale
from framework.training import loop
from framework.training.checkpoint import Checkpointer
from framework.training.metrics import MetricsWriter

log = logging.getLogger(__name__)

__all__ = ["SAEState", "check_finite", "fit", "fold_scales", "iterate_chunks", "lr_schedule", "state_shardings"]

NONFINITE = ("stop", "skip")
_ADVICE = "Lower sae.lr, set sae.grad_clip or check the activations; or pass nonfinite='skip' to skip such updates."

# optax >= 0.2.5 spells it optax.tree.norm (global_norm is deprecated there).
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def lr_schedule(cfg, steps: int) -> optax.Schedule:
    """Linear warm-up over lr_warmup_steps, constant, then decay to 0 over the last lr_decay_frac of the steps."""
    warm = min(cfg.lr_warmup_steps, steps)
    decay = 0 if cfg.lr_decay == "none" else int(round(cfg.lr_decay_frac * steps))
    decay = min(decay, steps - warm)
    parts, bounds = [], []
    if warm:
        parts.append(optax.linear_schedule(0.0, cfg.lr, warm))
        bounds.append(warm)
    parts.append(optax.constant_schedule(cfg.lr))
    if decay:
        bounds.append(steps - decay)
        if cfg.lr_decay == "linear":
            parts.append(optax.linear_schedule(cfg.lr, 0.0, decay))
        else:
            parts.append(optax.cosine_decay_schedule(cfg.lr, decay))
    return optax.join_schedules(parts, bounds) if bounds else parts[0]


def _optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    chain.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))
    return optax.chain(*chain)


def _split(params):
    trainable = {k: v for k, v in params.items() if k not in model.BUFFERS}
    buffers = {k: v for k, v in params.items() if k in model.BUFFERS}
    return trainable, buffers


@flax.struct.dataclass
class SAEState:
    """Everything a resumed SAE run needs besides the config; the data position is `step` (what a checkpoint holds).

    `params` are the trained parameters (in the normalised training space), `buffers` those set without gradient
    (BatchTopK's threshold), `since_fired` the training tokens since each latent last fired; `nonfinite_steps` and
    `first_nonfinite` count the updates dropped for a non-finite loss or gradient, as the loop's `TrainState` does.
    """

    step: jax.Array  # int32 scalar
    params: dict
    buffers: dict
    opt_state: Any
    since_fired: jax.Array  # int32 [L]
    nonfinite_steps: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    first_nonfinite: jax.Array = flax.struct.field(default_factory=lambda: jnp.full((), -1, jnp.int32))


def _make_chunk_fn(cfg, tx, schedule):
    """(state, x_SBD, y_SBO, scales) -> (state, per-step records): S training steps in one lax.scan."""

    def one_step(state: SAEState, batch):
        x, y = batch
        buffers, since_fired, step_i = state.buffers, state.since_fired, state.step
        sparsity_scale = (
            jnp.minimum(1.0, (step_i + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        )
        dead = since_fired >= cfg.dead_window

        def loss_fn(tr):
            return model.losses({**tr, **buffers}, cfg, x, y, sparsity_scale, dead)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            if cfg.normalize_decoder:
                W = params["W_dec"]
                params = dict(params, W_dec=W / jnp.maximum(jnp.linalg.norm(W, axis=1, keepdims=True), 1e-12))
            fired = jnp.where(parts["fired"], 0, since_fired + x.shape[0])
            new_buffers = buffers
            if "batch_threshold" in parts:
                m, old = cfg.threshold_momentum, buffers["threshold"]
                t = jnp.where(step_i == 0, parts["batch_threshold"], m * old + (1 - m) * parts["batch_threshold"])
                new_buffers = dict(buffers, threshold=t)
            return params, new_buffers, opt_state, fired

        def skip(_):
            return state.params, buffers, state.opt_state, since_fired

        # A non-finite update is dropped whole (params, moments, buffers, firing counters), as in the loop. A cond
        # rather than the loop's jnp.where: XLA:CPU then fuses the update as without the guard, bit for bit.
        params, buffers, opt_state, since_fired = jax.lax.cond(finite, apply, skip, None)
        new = SAEState(
            step=step_i + 1,
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            since_fired=since_fired,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where(~finite & (state.first_nonfinite < 0), step_i, state.first_nonfinite),
        )
        record = {
            "loss": loss,
            "mse": parts["mse"],
            "sparsity": parts["sparsity"],
            "aux_loss": parts["aux_loss"],
            "l0": parts["l0"],
            "fvu": 1.0 - metrics_lib.explained_variance(y, parts["y_hat"]),
            "dead_fraction": jnp.mean((new.since_fired >= cfg.dead_window).astype(jnp.float32)),
            "grad_norm": grad_norm,
            "lr": schedule(step_i),
            "nonfinite": (~finite).astype(jnp.int32),
        }
        return new, record

    def chunk(state, x_SBD, y_SBO, scale_in, scale_out):
        # y_SBO None: an SAE (targets = inputs), scaled once; a scale of exactly 1 (normalize_inputs off) is skipped.
        x_SBD = x_SBD if scale_in is None else x_SBD * scale_in
        y_SBO = x_SBD if y_SBO is None else (y_SBO if scale_out is None else y_SBO * scale_out)
        return jax.lax.scan(one_step, state, (x_SBD, y_SBO))

    return chunk


def fold_scales(params: dict, cfg, scale_in: float, scale_out: float) -> dict:
    """Parameters trained on (s_in x, s_out y) rewritten to act on raw (x, y); latents are unchanged."""
    p = dict(params)
    # pre = (s_in x - b) @ W_enc + b_enc = (x - b / s_in) @ (s_in W_enc) + b_enc; an SAE has s_in = s_out.
    p["W_enc"] = params["W_enc"] * scale_in
    p["b_dec"] = params["b_dec"] / scale_out
    p["W_dec"] = params["W_dec"] / scale_out
    if "threshold" in p and cfg.rank_by_decoder_norm and not cfg.normalize_decoder:
        p["threshold"] = params["threshold"] / scale_out  # it thresholds pre x ||W_dec row||, scaled by 1 / s_out
    return p


def fit(
    activations: Any,
    sae_cfg,
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    eval_activations: Any = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    metrics_dir: str | None = None,
    nonfinite: str = "stop",
    progress: bool = False,
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Trains an SAE (or transcoder) on `activations` and returns (sae_params, metrics).

    `activations`: an [N, d_in] array, a pair (x_in [N, d_in], y_out [N, d_out]) for a transcoder, or an
    `ActivationStore` (the hookpoints come from sae_cfg.hookpoint/out_hookpoint). Every input is checked (width,
    NaN/Inf, config keys) before anything compiles. `mesh` (+ `rules`, a logical-axis table as in
    `framework.sharding`, default DEFAULT_RULES): the batch is split along the `batch` rule's mesh axes and the
    latents along the `latents` rule's (`tensor`). `checkpoint_dir`: orbax checkpoints of the whole training state
    every `checkpoint_every` steps (a multiple of sae.steps_per_call and sae.log_every) and at the end; a rerun with
    the same directory resumes from the newest verified one and ends with the parameters of an uninterrupted run.
    `metrics_dir`: metrics.jsonl and tensorboard/ there, one `train/` record per sae.log_every steps (records past a
    resumed step are dropped first). `nonfinite`: "stop" raises FloatingPointError at a non-finite loss or gradient
    (never applied, never checkpointed), "skip" drops such updates and counts them. `metrics` holds "history" (one
    record per sae_cfg.log_every steps), "final" (metrics of `framework.sae.metrics` on `eval_activations`, default
    a sample of the training rows), "tokens_per_s" (training throughput after the first, compiling call),
    "nonfinite_steps" and the input-normalisation scales.
    """
    cfg = defaults.parse(sae_cfg)  # validated once, then read as a frozen SAEConfig
    rules = sharding.DEFAULT_RULES if rules is None else rules
    _check_fit_args(cfg, steps, batch_size, mesh, rules, checkpoint_dir, checkpoint_every, nonfinite)
    src = Source(activations, cfg, batch_size, seed)
    scale_in, scale_out = src.scales = _scales(cfg, src)
    src.mesh, src.rules = mesh, rules  # what _train_loop reads off the source besides its batches
    schedule = lr_schedule(cfg, steps)
    tx = _optimizer(cfg, schedule)
    state = _init_state(cfg, src, tx, seed, scale_out, mesh, rules)
    chunk_fn = jax.jit(_make_chunk_fn(cfg, tx, schedule), donate_argnums=0)

    ckpt, history, start, digest = None, [], 0, None
    if checkpoint_dir is not None:
        ckpt = Checkpointer(checkpoint_dir, keep=2)
        digest = _run_digest(cfg, steps, batch_size, seed, src.n)
        try:
            restored = _restore(ckpt, state, digest, checkpoint_dir)
        except BaseException:
            ckpt.close()
            raise
        if restored is not None:
            state, history = restored
            start = int(state.step)
            if start % cfg.log_every and start < steps:  # the history's windows are log_every steps from 0
                ckpt.close()
                raise ValueError(
                    f"sae.log_every = {cfg.log_every} does not divide the checkpointed step {start} in "
                    f"{checkpoint_dir}: resume with the log_every the run was written with"
                )
            src.skip(start)
            log.info("resumed SAE training from step %d in %s", start, checkpoint_dir)
    writer = None
    if metrics_dir is not None:
        # Records past the restored step (or all of them, starting over) belong to a run that did not finish.
        loop.truncate_metrics(metrics_dir, start if start else -1)
        writer = MetricsWriter(metrics_dir)

    recorder = _Recorder(history, start, steps, cfg.log_every, int(state.nonfinite_steps), nonfinite, writer)
    try:
        saver = None if ckpt is None else (ckpt, checkpoint_every, digest)
        state, timing = _train_loop(chunk_fn, state, src, cfg, steps, start, recorder, saver, progress)
    finally:
        if ckpt is not None:
            ckpt.close()
        if writer is not None:
            writer.close()

    state = jax.device_get(state)
    sae_params = fold_scales({**state.params, **state.buffers}, cfg, scale_in, scale_out)
    sae_params = jax.tree.map(jnp.asarray, sae_params)
    final = _final_metrics(sae_params, cfg, src, eval_activations)
    final["dead_fraction_train"] = float(np.mean(np.asarray(state.since_fired) >= cfg.dead_window))
    seconds, timed_tokens, t_first = timing
    out = {
        "history": recorder.history,
        "final": final,
        "tokens_per_s": (timed_tokens / seconds) if seconds > 0 and timed_tokens else float("nan"),
        "timed_steps": steps - t_first if t_first is not None else 0,
        "resumed_from": start,
        "nonfinite_steps": int(state.nonfinite_steps),
        "norm_scale_in": scale_in,
        "norm_scale_out": scale_out,
        "steps": steps,
        "batch_size": batch_size,
    }
    return sae_params, out


def _check_fit_args(cfg, steps, batch_size, mesh, rules, checkpoint_dir, checkpoint_every, nonfinite) -> None:
    """fit's argument checks (before anything compiles)."""
    defaults.validate(cfg)
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} = {v!r}; expected a positive int")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite = {nonfinite!r}; expected one of {NONFINITE}")
    if checkpoint_dir is not None:
        per = math.lcm(cfg.steps_per_call, cfg.log_every)
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every = {checkpoint_every!r}; expected a positive int with checkpoint_dir")
        if checkpoint_every % per:
            raise ValueError(
                f"checkpoint_every = {checkpoint_every}; expected a multiple of {per} (sae.steps_per_call = "
                f"{cfg.steps_per_call} and sae.log_every = {cfg.log_every})"
            )
    if mesh is not None:
        bad = batch_size % math.prod(mesh.shape[a] for a in _batch_axes(rules))
        if bad:
            raise ValueError(
                f"batch_size = {batch_size} is not divisible by the mesh axes {_batch_axes(rules)} of the batch rule"
            )


def _scales(cfg, src) -> tuple[float, float]:
    """(scale_in, scale_out): input normalisation to mean squared norm d_in (1.0 when off); an SAE has one scale."""
    scale_in = norm_scale(src.sample_in) if cfg.normalize_inputs else 1.0
    scale_out = (
        scale_in if src.sample_out is src.sample_in else (norm_scale(src.sample_out) if cfg.normalize_inputs else 1.0)
    )
    if not defaults.is_transcoder(cfg):
        scale_out = scale_in
    return scale_in, scale_out


def _init_state(cfg, src, tx, seed: int, scale_out: float, mesh, rules) -> SAEState:
    """Step-0 training state (placed on `mesh` when given)."""
    params = model.init_params(cfg, jax.random.key(seed), src.sample_out * scale_out)
    trainable, buffers = _split(params)
    state = SAEState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        buffers=buffers,
        opt_state=tx.init(trainable),
        since_fired=jnp.zeros(cfg.n_latents, jnp.int32),
    )
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh, rules))
    return state


def _restore(ckpt, state, digest: str, checkpoint_dir: str):
    """(state, history) of the newest verified checkpoint, None without one; a different run's checkpoint errors."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        return None
    state, meta = restored
    if meta.get("run_digest") != digest:
        raise ValueError(
            f"{checkpoint_dir} holds a checkpoint of a different SAE run (config, steps, batch_size, seed or "
            f"activation rows differ: digest {meta.get('run_digest')} != {digest}); use a new directory"
        )
    return state, list(meta["history"])


def _check_state(state: SAEState, policy: str) -> None:
    """The loop's finiteness check: under "stop", FloatingPointError naming the first dropped update."""
    first = int(state.first_nonfinite)
    if first >= 0 and policy == "stop":
        raise FloatingPointError(_nonfinite_message(first))


def _nonfinite_message(step: int) -> str:
    return (
        f"non-finite loss or gradients at step {step}; the update was not applied and no checkpoint holds it. "
        + _ADVICE
    )


class _Recorder:
    """Per-step chunk records -> history windows of `log_every` steps: checks each chunk's finiteness, averages the
    windows as they complete, keeps them (the checkpoint's history) and writes them to the metrics writer."""

    def __init__(self, history, start: int, steps: int, log_every: int, nonfinite_base: int, policy: str, writer):
        self.history, self.steps, self.log_every = list(history), steps, log_every
        self.policy, self.writer = policy, writer
        self.pending: dict[str, np.ndarray] = {}  # host records of steps [self.pending_start, self.end)
        self.pending_start = self.end = start
        self.nonfinite = nonfinite_base  # updates dropped before self.end

    def add(self, rec) -> None:
        """Takes the records of the next steps (a chunk's, still on device), checks them and emits full windows."""
        host = {k: np.asarray(v) for k, v in jax.device_get(rec).items()}
        flags = host.pop("nonfinite")
        bad = np.flatnonzero(flags)
        if bad.size and self.policy == "stop":
            raise FloatingPointError(_nonfinite_message(self.end + int(bad[0])))
        host["nonfinite_steps"] = self.nonfinite + np.cumsum(flags)
        self.nonfinite = int(host["nonfinite_steps"][-1])
        self.pending = {k: np.concatenate([self.pending[k], v]) if self.pending else v for k, v in host.items()}
        self.end += len(flags)
        bounds = [b for b in range(self.pending_start + 1, self.end + 1) if b % self.log_every == 0]
        if self.end == self.steps and self.steps % self.log_every:
            bounds.append(self.steps)
        for b in bounds:
            lo = (b - 1) // self.log_every * self.log_every
            i, j = lo - self.pending_start, b - self.pending_start
            record = {k: float(np.mean(v[i:j])) for k, v in self.pending.items() if k != "nonfinite_steps"}
            record["nonfinite_steps"] = int(self.pending["nonfinite_steps"][j - 1])
            self.history.append({"step": b, **record})
            if self.writer is not None:
                self.writer.write(b, record, prefix="train/")
        if bounds:
            cut = bounds[-1] - self.pending_start
            self.pending = {k: v[cut:] for k, v in self.pending.items()}
            self.pending_start = bounds[-1]


def _train_loop(chunk_fn, state, src, cfg, steps: int, start: int, recorder: _Recorder, saver, progress: bool):
    """Runs chunks of sae.steps_per_call steps from `start` to `steps`; returns (state, timing).

    A chunk's records are checked and logged once the next chunk is queued, so the checks do not stall the device.
    timing = (seconds, timed_tokens, t_first): the clock starts after the first (compiling) chunk and leaves out a
    shorter last chunk's compile, so tokens / seconds is the training throughput. `saver`: None or (Checkpointer,
    checkpoint_every, run digest). src.scales are passed to the chunk, a scale of exactly 1 as None (skipped).
    """
    scale_args = tuple(None if v == 1.0 else v for v in src.scales)
    mesh, rules, batch_size = src.mesh, src.rules, src.batch_size
    queued, done = None, start  # queued: the records of the last chunk, not yet checked
    t_first, t0, timed_tokens = None, None, 0
    while done < steps:
        s = min(cfg.steps_per_call, steps - done)
        x, y = src.chunk(s)
        if mesh is not None:
            x, y = _shard_batch(x, mesh, rules), (None if y is None else _shard_batch(y, mesh, rules))
        compiles = t0 is None or s != cfg.steps_per_call  # the first call, and a shorter last one, compile
        if compiles and t0 is not None:
            jax.block_until_ready(state)
            seconds_before = time.perf_counter() - t0
        state, rec = chunk_fn(state, x, y, *scale_args)
        if queued is not None:  # the previous chunk has finished by now: checking it does not stall the pipeline
            recorder.add(queued)
        queued = rec
        done += s
        if t0 is None:
            jax.block_until_ready(rec)
            t0 = time.perf_counter()
            t_first = done
        elif compiles:  # leave the compile out of the throughput: restart the clock after it
            jax.block_until_ready(rec)
            t0 = time.perf_counter() - seconds_before
        else:
            timed_tokens += s * batch_size
        if progress:
            print(f"sae step {done}/{steps} loss {float(rec['loss'][-1]):.4f} l0 {float(rec['l0'][-1]):.1f}")
        if saver is not None and (done % saver[1] == 0 or done == steps):
            recorder.add(queued)
            queued = None
            _check_state(state, recorder.policy)
            saver[0].save(state, meta={"run_digest": saver[2], "history": recorder.history}, force=done == steps)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    if queued is not None:
        recorder.add(queued)
    _check_state(state, recorder.policy)
    return state, (seconds, timed_tokens, t_first)


def _final_metrics(sae_params, cfg, src, eval_activations) -> dict:
    """framework.sae.metrics on eval_activations (default: the training sample)."""
    if eval_activations is None:
        ev_in, ev_out = src.sample_in, src.sample_out
    elif isinstance(eval_activations, (tuple, list)):
        ev_in, ev_out = eval_activations
    else:
        ev_in = ev_out = eval_activations
    return metrics_lib.evaluate(sae_params, cfg, np.asarray(ev_in), np.asarray(ev_out))


def _run_digest(cfg, steps: int, batch_size: int, seed: int, n_rows: int) -> str:
    d = dict(cfg.to_dict(), steps=steps, batch_size=batch_size, seed=seed, n_rows=n_rows)
    d.pop("log_every", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Logical axes of the SAE's parameters (the optimizer state mirrors them); sharded by the config's rules table.
_LOGICAL = {
    "W_enc": (None, "latents"),
    "b_enc": ("latents",),
    "W_dec": ("latents", None),
    "log_threshold": ("latents",),
    "r_mag": ("latents",),
    "b_mag": ("latents",),
}


def _batch_axes(rules) -> tuple[str, ...]:
    axes = dict(rules)["batch"]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def state_shardings(state, mesh: jax.sharding.Mesh, rules=None):
    """NamedShardings of an SAE state: latent dims by the `latents` rule, since_fired too, the rest replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rules = sharding.DEFAULT_RULES if rules is None else rules

    def place(path, x):
        key = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
        spec = _LOGICAL.get(key, ("latents",) if key == "since_fired" else ())
        return NamedSharding(mesh, sharding.logical_to_mesh_spec(P(*spec), np.shape(x), mesh, rules))

    return jax.tree_util.tree_map_with_path(place, state)


def _shard_batch(x_SBD, mesh, rules):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return jax.device_put(x_SBD, NamedSharding(mesh, P(None, _batch_axes(rules), None)))
