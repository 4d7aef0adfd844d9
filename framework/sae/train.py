"""Training SAEs and transcoders: `fit(activations, sae_cfg, *, steps, batch_size, seed) -> (sae_params, metrics)`.

Several training steps run in one compiled call (`lax.scan` over `sae.steps_per_call` batches); for an in-memory
array the batches are gathered on device from seeded index permutations, for an `ActivationStore` they come from
its shuffling buffer. With `normalize_inputs`, inputs (and targets) are scaled to mean squared norm d_in during
training and the scale is folded back into the weights at the end, so the returned parameters work on raw
activations (the scales are reported in `metrics["norm_scale_in"|"norm_scale_out"]`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from framework.sae import defaults, model
from framework.sae import metrics as metrics_lib

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


def _make_chunk_fn(cfg, tx, steps: int):
    """(state, x_SBD, y_SBO, scales) -> (state, per-step records): S training steps in one lax.scan."""

    def one_step(state, batch):
        x, y = batch
        trainable, buffers, opt_state, since_fired, step_i = state
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
        f = parts["latents"]
        fired = jnp.any(f != 0, axis=0)
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
            "l0": metrics_lib.l0(f),
            "fvu": 1.0 - metrics_lib.explained_variance(y, parts["y_hat"]),
            "dead_fraction": jnp.mean((since_fired >= cfg.dead_window).astype(jnp.float32)),
        }
        return (trainable, buffers, opt_state, since_fired, step_i + 1), record

    def chunk(state, x_SBD, y_SBO, scale_in, scale_out):
        return jax.lax.scan(one_step, state, (x_SBD * scale_in, y_SBO * scale_out))

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
    eval_activations: Any = None,
    progress: bool = False,
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Trains an SAE (or transcoder) on `activations` and returns (sae_params, metrics).

    `activations`: an [N, d_in] array, a pair (x_in [N, d_in], y_out [N, d_out]) for a transcoder, or an
    `ActivationStore` (the hookpoints come from sae_cfg.hookpoint/out_hookpoint). Every input is checked (width,
    NaN/Inf, config keys) before anything compiles. `mesh`: shard the batch over `data` and the latents over
    `tensor`. `metrics` holds "history" (one record per sae_cfg.log_every steps), "final" (metrics of
    `framework.sae.metrics` on `eval_activations`, default a sample of the training rows), "tokens_per_s"
    (training throughput after the first, compiling call) and the input-normalisation scales.
    """
    defaults.validate(sae_cfg)
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} = {v!r}; expected a positive int")
    cfg = sae_cfg
    src = _Source(activations, cfg, batch_size, seed)
    scale_in = _norm_scale(src.sample_in) if cfg.normalize_inputs else 1.0
    scale_out = (
        scale_in if src.sample_out is src.sample_in else (_norm_scale(src.sample_out) if cfg.normalize_inputs else 1.0)
    )
    if not defaults.is_transcoder(cfg):
        scale_out = scale_in
    params = model.init_params(cfg, jax.random.key(seed), src.sample_out * scale_out)
    trainable, buffers = _split(params)
    tx = _optimizer(cfg, steps)
    state = (trainable, buffers, tx.init(trainable), jnp.zeros(cfg.n_latents, jnp.int32), jnp.zeros((), jnp.int32))
    if mesh is not None:
        state = _shard_state(state, mesh)
    chunk_fn = jax.jit(_make_chunk_fn(cfg, tx, steps), donate_argnums=0)

    history, records, done = [], [], 0
    t_first, t0, timed_tokens = None, None, 0
    while done < steps:
        s = min(cfg.steps_per_call, steps - done)
        x, y = src.chunk(s)
        if mesh is not None:
            x, y = _shard_batch(x, mesh), (None if y is None else _shard_batch(y, mesh))
        compiles = t0 is None or s != cfg.steps_per_call  # the first call, and a shorter last one, compile
        if compiles and t0 is not None:
            jax.block_until_ready(state)
            seconds_before = time.perf_counter() - t0
        state, rec = chunk_fn(state, x, x if y is None else y, scale_in, scale_out)
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
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    recs = {k: np.concatenate([np.asarray(r[k]) for r in records]) for k in records[0]}
    for end in range(cfg.log_every, steps + 1, cfg.log_every):
        history.append({"step": end, **{k: float(np.mean(v[end - cfg.log_every : end])) for k, v in recs.items()}})
    if steps % cfg.log_every:
        start = steps - steps % cfg.log_every
        history.append({"step": steps, **{k: float(np.mean(v[start:])) for k, v in recs.items()}})

    trainable, buffers, _, since_fired, _ = jax.device_get(state)
    sae_params = fold_scales({**trainable, **buffers}, cfg, scale_in, scale_out)
    sae_params = jax.tree.map(jnp.asarray, sae_params)
    if eval_activations is None:
        ev_in, ev_out = src.sample_in, src.sample_out
    elif isinstance(eval_activations, (tuple, list)):
        ev_in, ev_out = eval_activations
    else:
        ev_in = ev_out = eval_activations
    final = metrics_lib.evaluate(sae_params, cfg, np.asarray(ev_in), np.asarray(ev_out))
    final["dead_fraction_train"] = float(np.mean(np.asarray(since_fired) >= cfg.dead_window))
    out = {
        "history": history,
        "final": final,
        "tokens_per_s": (timed_tokens / seconds) if seconds > 0 and timed_tokens else float("nan"),
        "timed_steps": steps - t_first,
        "norm_scale_in": scale_in,
        "norm_scale_out": scale_out,
        "steps": steps,
        "batch_size": batch_size,
    }
    return sae_params, out


_LATENT_SHARDED = {"W_enc": (None, "tensor"), "b_enc": ("tensor",), "W_dec": ("tensor", None)}
_LATENT_SHARDED.update({"log_threshold": ("tensor",), "r_mag": ("tensor",), "b_mag": ("tensor",)})


def _shard_state(state, mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def place(path, x):
        key = getattr(path[-1], "key", None) if path else None
        if x.ndim and key in _LATENT_SHARDED and mesh.shape.get("tensor", 1) > 1:
            return jax.device_put(x, NamedSharding(mesh, P(*_LATENT_SHARDED[key])))
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree_util.tree_map_with_path(place, state)


def _shard_batch(x_SBD, mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return jax.device_put(x_SBD, NamedSharding(mesh, P(None, "data", None)))


def iterate_chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive row blocks of `x` (for chunked evaluation of large arrays)."""
    for i in range(0, len(x), size):
        yield x[i : i + size]
