"""Orbax checkpoints of the train state: async saves, keep-N, automatic resume, verification before use.

A checkpoint holds the whole `TrainState` (params, optimizer state, step, RNG) plus a small JSON record (the step,
a digest of the config it was written under, and whether every parameter was finite). Since batch i is a pure
function of (seed, i), the step is the exact data position: resume continues the same stream.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def all_finite(tree) -> jax.Array:
    """True iff every floating leaf of `tree` is finite (a jax bool scalar)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class Checkpointer:
    """Thin wrapper over `orbax.checkpoint.CheckpointManager` for a TrainState."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
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
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=step)))
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, meta) at `step` (default latest) into the shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        state, meta = restored["state"], restored["meta"]
        if int(state.step) != step or meta.get("step") != step:
            raise ValueError(
                f"checkpoint {step} in {self.directory} is inconsistent: holds step {int(state.step)}, "
                f"record says {meta.get('step')}"
            )
        if not bool(all_finite(state.params)):
            raise ValueError(f"checkpoint {step} in {self.directory} holds non-finite parameters")
        return state, meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
