"""Training data for `framework.sae.fit`: checked in-memory arrays or an `ActivationStore`, served in chunks.

Glossary: N activation rows, D input width (d_in), O output width (d_out), S steps per chunk, B batch rows.

For an in-memory array the batches are gathered on device from seeded index permutations (one permutation per pass
over the rows); for an `ActivationStore` they come from its shuffling buffer. Batch i is the i-th of this stream, so
a step count is an exact data position (`skip` replays the stream's host-side draws without gathering).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from framework.sae import defaults

NORM_SAMPLE = 8192  # rows used for the input-norm scale and the b_dec initialisation


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


def norm_scale(sample: np.ndarray) -> float:
    """s with mean ||s x||^2 = width over the sample."""
    ms = float(np.mean(np.sum(np.asarray(sample, np.float64) ** 2, axis=1)))
    return math.sqrt(sample.shape[1] / ms) if ms > 0 else 1.0


class Source:
    """Uniform access to training data: a host sample for init, and chunks of S batches."""

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
            first = np.asarray(activations.array(self.in_name)[: min(self.n, NORM_SAMPLE)])
            check_finite(first, f"store activations at {self.in_name!r}")
            self.sample_in = first
            self.sample_out = np.asarray(activations.array(self.out_name)[: min(self.n, NORM_SAMPLE)])
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
            sample = rng.choice(self.n, size=min(self.n, NORM_SAMPLE), replace=False)
            self.sample_in = np.asarray(x[np.sort(sample)], np.float32)
            self.sample_out = self.sample_in if y is x else np.asarray(y[np.sort(sample)], np.float32)
            self._rng = rng
            self._perm, self._pos = rng.permutation(self.n), 0
        self.batch_size = batch_size

    def chunk(self, s: int):
        """(x_SBD, y_SBO) device arrays for the next s steps (y None for an SAE: its targets are its inputs)."""
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


def iterate_chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive row blocks of `x` (for chunked evaluation of large arrays)."""
    for i in range(0, len(x), size):
        yield x[i : i + size]
