"""Orbax checkpoints of the train state: async saves, keep-N and keep-every-K, verified restore with fallback.

A checkpoint holds the whole `TrainState` (params, optimizer state, step, RNG) plus a small JSON record (the step,
a digest of the config it was written under, and a checksum of every leaf). Since batch i is a pure function of
(seed, i), the step is the exact data position: resume continues the same stream.

Restoring verifies the record and the checksums, so a truncated or corrupted checkpoint (a pre-empted copy, a bad
disk, a half-synced bucket) is detected rather than trained on; `restore_latest` then moves it aside to
`<directory>.corrupt/` and falls back to the previous good step, with a warning naming what was wrong. A sound
checkpoint written for another model (parameters renamed, added or reshaped since: a config or code change) is
not damage: restoring it raises `CheckpointMismatch` naming the differences and leaves it where it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True iff every floating leaf of `tree` is finite (a jax bool scalar; one compiled program per tree layout)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A position-weighted sum of a leaf's bits mod 2**32: exact integer arithmetic, so independent of sharding."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
        if width is None:
            raise TypeError(f"cannot checksum a leaf of dtype {x.dtype} (itemsize {x.dtype.itemsize})")
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    bits = bits.reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def checksums(tree) -> list[int]:
    """One uint32 checksum per leaf of `tree` (in `jax.tree.leaves` order), as Python ints."""
    out = _checksums(tree)
    return [int(v) for v in np.asarray(out.addressable_data(0))]


class CheckpointError(ValueError):
    """A checkpoint on disk is unusable (truncated, corrupted, inconsistent)."""


class CheckpointMismatch(ValueError):
    """A readable checkpoint written for another model: its parameters' names or shapes differ from the ones asked
    for. Left in place (it is not damaged): train elsewhere, or restore it with the config and code that wrote it."""


def params_mismatch(state_dir: str, abstract_params) -> str | None:
    """What differs between the parameters saved in `state_dir` (a checkpoint's "state" item) and `abstract_params`
    (names and shapes), or None where they agree or the saved tree cannot be read (the restore reports that)."""
    try:
        with ocp.StandardCheckpointer() as reader:
            flat = jax.tree_util.tree_flatten_with_path(reader.metadata(state_dir).item_metadata)[0]
    except Exception:  # no or damaged metadata: not a mismatch, and `restore` names the damage
        return None
    prefix = "['params']"
    saved = {
        jax.tree_util.keystr(p)[len(prefix) :]: tuple(leaf.shape)
        for p, leaf in flat
        if jax.tree_util.keystr(p).startswith(prefix) and hasattr(leaf, "shape")
    }
    want = {
        jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    if not saved:
        return None

    def some(xs: list[str]) -> str:
        return ", ".join(xs[:4]) + (f" and {len(xs) - 4} more" if len(xs) > 4 else "")

    common = sorted(want.keys() & saved.keys())
    reshaped = [f"{k} {saved[k]} (the model's {want[k]})" for k in common if saved[k] != want[k]]
    problems = [
        f"{verb} {some(keys)}"
        for verb, keys in (
            ("lacks", sorted(want.keys() - saved.keys())),
            ("has", sorted(saved.keys() - want.keys())),
            ("holds", reshaped),
        )
        if keys
    ]
    return "; ".join(problems) or None


class Checkpointer:
    """A `orbax.checkpoint.CheckpointManager` for a TrainState, with verification and fallback on restore.

    keep: newest checkpoints kept; keep_every: also keep every step that is a multiple of it (0 = none);
    async_save: write in a background thread so training goes on while a checkpoint is written.
    """

    def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # a save killed half-way leaves a tmp dir: never a step, removed here
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state, *, meta: dict[str, Any], force: bool = False) -> bool:
        """Saves `state` at its step (async); refuses, loudly, to write non-finite parameters."""
        if not bool(all_finite(state.params)):
            raise FloatingPointError(f"refusing to checkpoint step {int(state.step)}: parameters are not finite")
        step = int(state.step)
        record = dict(meta, step=step, checksums=checksums(state))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record))
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, meta) at `step` (default latest) into the shardings of `abstract_state`, verified.

        Raises CheckpointError naming the problem if the checkpoint is unreadable, inconsistent, holds non-finite
        parameters or does not match its recorded checksums, and CheckpointMismatch if it holds other parameters
        (names or shapes) than `abstract_state`'s.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        where = f"checkpoint {step} in {self.directory}"
        if hasattr(abstract_state, "params"):
            diff = params_mismatch(os.path.join(self.directory, str(step), "state"), abstract_state.params)
            if diff:
                raise CheckpointMismatch(
                    f"{where} was written for another model: it {diff}. The config or the code changed since it "
                    "was written; it is left in place: train in a new workdir, or restore it with the config and "
                    "code that wrote it"
                )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax/tensorstore raise many types for a damaged file; all mean "unreadable"
            raise CheckpointError(f"{where} is unreadable: {type(e).__name__}: {_first_line(e)}") from e
        state, meta = restored["state"], restored["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step or int(state.step) != step:
            got = meta.get("step") if isinstance(meta, dict) else meta
            raise CheckpointError(f"{where} is inconsistent: holds step {int(state.step)}, record says {got}")
        if "checksums" in meta:
            got, want = checksums(state), meta["checksums"]
            if len(got) != len(want):
                raise CheckpointError(f"{where}: {len(got)} arrays restored, the record lists {len(want)}")
            bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
            if bad:
                paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
                raise CheckpointError(
                    f"{where} is corrupted: checksum mismatch in {len(bad)} array(s), e.g. {paths[bad[0]]}"
                )
        if not bool(all_finite(state.params)):
            raise CheckpointError(f"{where} holds non-finite parameters")
        return state, meta

    def restore_latest(self, abstract_state):
        """(state, meta) of the newest checkpoint that verifies, or None if there is none.

        A damaged checkpoint is logged (warning naming the step and the problem), moved to `<directory>.corrupt/`
        and skipped; if checkpoints exist but none verifies, raises CheckpointError listing every problem. One
        written for another model raises CheckpointMismatch (nothing is moved).
        """
        problems = []
        for step in reversed(self.all_steps()):
            try:
                out, error = self.restore(abstract_state, step), None
            except CheckpointError as e:
                out, error = None, e
            if not _everywhere(error is None):  # processes read different files: all must agree to use it
                e = error or CheckpointError(
                    f"checkpoint {step} in {self.directory}: another process failed to read it"
                )
                problems.append(str(e))
                moved = self._quarantine(step)
                older = [s for s in self.all_steps() if s < step]
                log.warning(
                    "%s; moved it to %s; falling back to %s",
                    e,
                    moved,
                    f"step {older[-1]}" if older else "nothing (no older checkpoint)",
                )
                continue
            return out
        if problems:
            raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
        return None

    def _quarantine(self, step: int) -> str:
        dest = os.path.join(self.directory + ".corrupt", f"{step}.{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"lumen_quarantine_{step}")
        self._manager.reload()
        return dest

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _everywhere(ok: bool) -> bool:
    """True iff `ok` holds on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
