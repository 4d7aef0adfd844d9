"""Experiments: one module per experiment, each exposing `validate(config)` and `run(config, workdir)`."""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS = ("train_lm", "sae", "tts", "preference", "vlm", "routing", "agents", "memory", "generate")


def get(name: str) -> ModuleType:
    """The experiment module `experiments.<name>` (it must define `run(config, workdir)`)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"config.experiment = {name!r} is not one of {EXPERIMENTS}")
    module = importlib.import_module(f"experiments.{name}")
    return module
