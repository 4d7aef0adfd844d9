"""Training SAEs and transcoders: `fit(activations, sae_cfg, *, steps, batch_size, seed) -> (sae_params, metrics)`.

Several training steps run in one compiled call (`lax.scan` over `sae.steps_per_call` batches); for an in-memory
array the batches are gathered on device from seeded index permutations, for an `ActivationStore` they come from
its shuffling buffer. With `normalize_inputs`, inputs (and targets) are scaled to mean squared norm d_in during
training and the scale is folded back into the weights at the end, so the returned parameters work on raw
activations (the scales are reported in `metrics["norm_scale_in"|"norm_scale_out"]`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from framework import sharding
from framework.sae import defaults, model
from framework.sae import metrics as metrics_lib
from framework.training.checkpoint import Checkpointer

log = logging.getLogger(__name__)

_NORM_SAMPLE = 8192  # rows used for the input-norm scale and the b_dec initialisation


def check_finite(x: np.ndarray, what: str) -> None:
    """ValueError naming the first NaN/Inf entry (row, column) of `x`."""
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what} contain a non-finite value ({x[r, c]}) at row {r}, column {c}; expected finite floats"
        )


def _check_array(x, width: int, key: str, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [N, D] array, got shape {x.shape}")
    if x.shape[1] != width:
        raise ValueError(f"{what} have width {x.shape[1]} but sae.{key} = {width}; expected [N, {width}]")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got dtype {x.dtype}")
    return x


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


def _optimizer(cfg, steps: int) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    chain.append(optax.adam(lr_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2))
    return optax.chain(*chain)


def _split(params):
    trainable = {k: v for k, v in params.items() if k not in model.BUFFERS}
    buffers = {k: v for k, v in params.items() if k in model.BUFFERS}
    return trainable, buffers


@flax.struct.dataclass
class SAEState:
    """Everything a resumed SAE run needs besides the config; the data position is `step` (what a checkpoint holds).

    `params` are the trained parameters (in the normalised training space), `buffers` those set without gradient
    (BatchTopK's threshold), `since_fired` the training tokens since each latent last fired.
    """

    step: jax.Array  # int32 scalar
    params: dict
    buffers: dict
    opt_state: Any
    since_fired: jax.Array  # int32 [L]


def _make_chunk_fn(cfg, tx, steps: int):
    """(state, x_SBD, y_SBO, scales) -> (state, per-step records): S training steps in one lax.scan."""

    def one_step(state: SAEState, batch):
        x, y = batch
        trainable, buffers, opt_state, since_fired, step_i = (
            state.params,
            state.buffers,
            state.opt_state,
            state.since_fired,
            state.step,
        )
        sparsity_scale = (
            jnp.minimum(1.0, (step_i + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        )
        dead = since_fired >= cfg.dead_window

        def loss_fn(tr):
            return model.losses({**tr, **buffers}, cfg, x, y, sparsity_scale, dead)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if cfg.normalize_decoder:
            W = trainable["W_dec"]
            trainable = dict(trainable, W_dec=W / jnp.maximum(jnp.linalg.norm(W, axis=1, keepdims=True), 1e-12))
        fired = parts["fired"]
        since_fired = jnp.where(fired, 0, since_fired + x.shape[0])
        if "batch_threshold" in parts:
            m = cfg.threshold_momentum
            old = buffers["threshold"]
            new = jnp.where(step_i == 0, parts["batch_threshold"], m * old + (1 - m) * parts["batch_threshold"])
            buffers = dict(buffers, threshold=new)
        record = {
            "loss": loss,
            "mse": parts["mse"],
            "sparsity": parts["sparsity"],
            "aux_loss": parts["aux_loss"],
            "l0": parts["l0"],
            "fvu": 1.0 - metrics_lib.explained_variance(y, parts["y_hat"]),
            "dead_fraction": jnp.mean((since_fired >= cfg.dead_window).astype(jnp.float32)),
        }
        new = SAEState(step=step_i + 1, params=trainable, buffers=buffers, opt_state=opt_state, since_fired=since_fired)
        return new, record

    def chunk(state, x_SBD, y_SBO, scale_in, scale_out):
        # y_SBO None: an SAE (targets = inputs), scaled once; a scale of exactly 1 (normalize_inputs off) is skipped.
        x_SBD = x_SBD if scale_in is None else x_SBD * scale_in
        y_SBO = x_SBD if y_SBO is None else (y_SBO if scale_out is None else y_SBO * scale_out)
        return jax.lax.scan(one_step, state, (x_SBD, y_SBO))

    return chunk


def _norm_scale(sample: np.ndarray) -> float:
    """s with mean ||s x||^2 = width over the sample."""
    ms = float(np.mean(np.sum(np.asarray(sample, np.float64) ** 2, axis=1)))
    return math.sqrt(sample.shape[1] / ms) if ms > 0 else 1.0


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


class _Source:
    """Uniform access to training data: host sample for init, and chunks of S batches."""

    def __init__(self, activations, cfg, batch_size: int, seed: int):
        from framework.sae.store import ActivationStore  # a store is optional; arrays need nothing of it

        self.cfg = cfg
        self.store = None
        if isinstance(activations, ActivationStore):
            self.store = activations
            self.in_name, self.out_name = activations.resolve(cfg)
            self.n = activations.num_tokens
            widths = activations.widths
            for name, key, width in ((self.in_name, "d_in", cfg.d_in), (self.out_name, "d_out", defaults.d_out(cfg))):
                if widths[name] != width:
                    raise ValueError(
                        f"store hookpoint {name!r} has width {widths[name]} but sae.{key} = {width}; expected equal"
                    )
            self._iter = activations.batches(
                [self.in_name] if self.out_name == self.in_name else [self.in_name, self.out_name],
                batch_size=batch_size,
                seed=seed,
            )
            first = np.asarray(activations.array(self.in_name)[: min(self.n, _NORM_SAMPLE)])
            check_finite(first, f"store activations at {self.in_name!r}")
            self.sample_in = first
            self.sample_out = np.asarray(activations.array(self.out_name)[: min(self.n, _NORM_SAMPLE)])
        else:
            if isinstance(activations, (tuple, list)):
                if len(activations) != 2:
                    raise ValueError(f"transcoder activations must be a pair (x_in, y_out), got {len(activations)}")
                x, y = activations
            else:
                x, y = activations, None
                if defaults.is_transcoder(cfg):
                    raise ValueError("a transcoder config (d_out/out_hookpoint set) needs activations=(x_in, y_out)")
            x = _check_array(x, cfg.d_in, "d_in", "activations")
            y = x if y is None else _check_array(y, defaults.d_out(cfg), "d_out", "target activations")
            if len(y) != len(x):
                raise ValueError(f"x_in has {len(x)} rows but y_out has {len(y)}; expected equal")
            check_finite(x, "activations")
            if y is not x:
                check_finite(y, "target activations")
            self.n = len(x)
            if self.n < batch_size:
                raise ValueError(f"batch_size = {batch_size} exceeds the {self.n} activation rows")
            self.x = jnp.asarray(x, jnp.float32)
            self.y = self.x if y is x else jnp.asarray(y, jnp.float32)
            rng = np.random.default_rng(seed)
            sample = rng.choice(self.n, size=min(self.n, _NORM_SAMPLE), replace=False)
            self.sample_in = np.asarray(x[np.sort(sample)], np.float32)
            self.sample_out = self.sample_in if y is x else np.asarray(y[np.sort(sample)], np.float32)
            self._rng = rng
            self._perm, self._pos = rng.permutation(self.n), 0
        self.batch_size = batch_size

    def chunk(self, s: int):
        """(x_SBD, y_SBO) device arrays for the next s steps."""
        if self.store is None:
            idx = self._indices_fast(s)
            return _gather(self.x, idx), (None if self.y is self.x else _gather(self.y, idx))
        xs, ys = [], []
        for _ in range(s):
            b = next(self._iter)
            xs.append(b[self.in_name])
            ys.append(b[self.out_name])
        x = jnp.asarray(np.stack(xs), jnp.float32)
        return x, (None if self.out_name == self.in_name else jnp.asarray(np.stack(ys), jnp.float32))

    def skip(self, steps: int) -> None:
        """Advances the stream past `steps` batches (resume: the data position is the step count)."""
        if self.store is None:
            for _ in range(steps // 1000):
                self._indices_fast(1000)
            if steps % 1000:
                self._indices_fast(steps % 1000)
        else:
            for _ in range(steps):
                next(self._iter)

    def _indices_fast(self, s: int) -> np.ndarray:
        need = s * self.batch_size
        parts = []
        while need:
            take = min(need, self.n - self._pos)
            parts.append(self._perm[self._pos : self._pos + take])
            self._pos += take
            need -= take
            if self._pos == self.n:
                self._perm, self._pos = self._rng.permutation(self.n), 0
        return np.concatenate(parts).astype(np.int32).reshape(s, self.batch_size)


@jax.jit
def _gather(x, idx):
    return x[idx]


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
    progress: bool = False,
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Trains an SAE (or transcoder) on `activations` and returns (sae_params, metrics).

    `activations`: an [N, d_in] array, a pair (x_in [N, d_in], y_out [N, d_out]) for a transcoder, or an
    `ActivationStore` (the hookpoints come from sae_cfg.hookpoint/out_hookpoint). Every input is checked (width,
    NaN/Inf, config keys) before anything compiles. `mesh` (+ `rules`, a logical-axis table as in
    `framework.sharding`, default DEFAULT_RULES): the batch is split along the `batch` rule's mesh axes and the
    latents along the `latents` rule's (`tensor`). `checkpoint_dir`: orbax checkpoints of the whole training state
    every `checkpoint_every` steps (a multiple of sae.steps_per_call and sae.log_every) and at the end; a rerun with
    the same directory resumes from the newest verified one and ends with the parameters of an uninterrupted run. A
    non-finite loss stops training with FloatingPointError before any checkpoint holds it. `metrics` holds
    "history" (one record per sae_cfg.log_every steps), "final" (metrics of `framework.sae.metrics` on
    `eval_activations`, default a sample of the training rows), "tokens_per_s" (training throughput after the
    first, compiling call) and the input-normalisation scales.
    """
    cfg = sae_cfg
    rules = sharding.DEFAULT_RULES if rules is None else rules
    _check_fit_args(cfg, steps, batch_size, mesh, rules, checkpoint_dir, checkpoint_every)
    src = _Source(activations, cfg, batch_size, seed)
    scale_in, scale_out = src.scales = _scales(cfg, src)
    src.mesh, src.rules = mesh, rules  # what _train_loop reads off the source besides its batches
    tx = _optimizer(cfg, steps)
    state = _init_state(cfg, src, tx, seed, scale_out, mesh, rules)
    chunk_fn = jax.jit(_make_chunk_fn(cfg, tx, steps), donate_argnums=0)

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
            src.skip(start)
            log.info("resumed SAE training from step %d in %s", start, checkpoint_dir)

    try:
        saver = None if ckpt is None else (ckpt, checkpoint_every, digest)
        state, history, timing = _train_loop(chunk_fn, state, src, cfg, steps, start, history, saver, progress)
    finally:
        if ckpt is not None:
            ckpt.close()

    state = jax.device_get(state)
    sae_params = fold_scales({**state.params, **state.buffers}, cfg, scale_in, scale_out)
    sae_params = jax.tree.map(jnp.asarray, sae_params)
    final = _final_metrics(sae_params, cfg, src, eval_activations)
    final["dead_fraction_train"] = float(np.mean(np.asarray(state.since_fired) >= cfg.dead_window))
    seconds, timed_tokens, t_first = timing
    out = {
        "history": history,
        "final": final,
        "tokens_per_s": (timed_tokens / seconds) if seconds > 0 and timed_tokens else float("nan"),
        "timed_steps": steps - t_first if t_first is not None else 0,
        "resumed_from": start,
        "norm_scale_in": scale_in,
        "norm_scale_out": scale_out,
        "steps": steps,
        "batch_size": batch_size,
    }
    return sae_params, out


def _check_fit_args(cfg, steps, batch_size, mesh, rules, checkpoint_dir, checkpoint_every) -> None:
    """fit's argument checks (before anything compiles)."""
    defaults.validate(cfg)
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} = {v!r}; expected a positive int")
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
    scale_in = _norm_scale(src.sample_in) if cfg.normalize_inputs else 1.0
    scale_out = (
        scale_in if src.sample_out is src.sample_in else (_norm_scale(src.sample_out) if cfg.normalize_inputs else 1.0)
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


def _train_loop(chunk_fn, state, src, cfg, steps: int, start: int, history: list, saver, progress: bool):
    """Runs chunks of sae.steps_per_call steps from `start` to `steps`; returns (state, history, timing).

    timing = (seconds, timed_tokens, t_first): the clock starts after the first (compiling) chunk and leaves out a
    shorter last chunk's compile, so tokens / seconds is the training throughput. `saver`: None or (Checkpointer,
    checkpoint_every, run digest). src.scales are passed to the chunk, a scale of exactly 1 as None (skipped).
    """
    scale_args = tuple(None if v == 1.0 else v for v in src.scales)
    mesh, rules, batch_size = src.mesh, src.rules, src.batch_size
    records, done = [], start
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
        if records:  # the previous chunk has finished by now: checking it does not stall the pipeline
            _check_losses(records[-1], done - len(records[-1]["loss"]))
        records.append(rec)
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
            _check_losses(rec, done - s)
            upto = _history(_host(records), start, done, cfg.log_every, steps)
            saver[0].save(state, meta={"run_digest": saver[2], "history": history + upto}, force=done == steps)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    if records:
        _check_losses(records[-1], done - len(records[-1]["loss"]))
        history = history + _history(_host(records), start, steps, cfg.log_every, steps)
    return state, history, (seconds, timed_tokens, t_first)


def _final_metrics(sae_params, cfg, src, eval_activations) -> dict:
    """framework.sae.metrics on eval_activations (default: the training sample)."""
    if eval_activations is None:
        ev_in, ev_out = src.sample_in, src.sample_out
    elif isinstance(eval_activations, (tuple, list)):
        ev_in, ev_out = eval_activations
    else:
        ev_in = ev_out = eval_activations
    return metrics_lib.evaluate(sae_params, cfg, np.asarray(ev_in), np.asarray(ev_out))


def _host(records) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.asarray(r[k]) for r in records]) for k in records[0]}


def _history(recs: dict[str, np.ndarray], start: int, end: int, log_every: int, steps: int) -> list[dict]:
    """History records (means over log_every steps) of the steps start..end-1; recs[k][i] is step start + i."""
    out = []
    bounds = [b for b in range(start + log_every, end + 1, log_every)]
    if end == steps and steps % log_every:
        bounds.append(steps)
    for b in bounds:
        lo = (b - 1) // log_every * log_every
        out.append({"step": b, **{k: float(np.mean(v[lo - start : b - start])) for k, v in recs.items()}})
    return out


def _check_losses(rec, first_step: int) -> None:
    loss = np.asarray(rec["loss"])
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        raise FloatingPointError(
            f"SAE training loss is {loss[bad[0]]} at step {first_step + int(bad[0])}; stopped before checkpointing "
            "it (lower sae.lr, set sae.grad_clip, or check the activations)"
        )


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


def iterate_chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive row blocks of `x` (for chunked evaluation of large arrays)."""
    for i in range(0, len(x), size):
        yield x[i : i + size]
