"""Adapter-only checkpoints (orbax): the trainable {"a", "b"[, "m"]} leaves, never the frozen base."""

from __future__ import annotations

import pathlib

import orbax.checkpoint as ocp


def save_adapters(path: str | pathlib.Path, adapters) -> None:
    """Writes an `adapter_params` tree to `path` (a new directory)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(pathlib.Path(path).absolute(), adapters)


def load_adapters(path: str | pathlib.Path, like=None):
    """Reads adapters saved by `save_adapters`; `like` (an adapter tree or its shapes) fixes structure and dtypes."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(pathlib.Path(path).absolute(), like)
