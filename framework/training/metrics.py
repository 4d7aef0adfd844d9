"""Metrics to `metrics.jsonl` and TensorBoard, written by process 0 only."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np


class MetricsWriter:
    """Appends one JSON object per call to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
        if not self.active:
            return
        clean = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (empty if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_metrics(title: str, metrics: Mapping, skip: tuple[str, ...] = ()) -> str:
    """A titled block of `name  value` lines for the terminal (nested dicts flattened as `outer/inner`; lists and
    keys in `skip` left out): what an experiment prints at its end, beside the JSON it writes."""

    def flat(d, prefix=""):
        for k, v in d.items():
            if k in skip:
                continue
            if isinstance(v, Mapping):
                yield from flat(v, f"{prefix}{k}/")
            elif v is None or isinstance(v, (bool, int, float, str, np.number)):
                yield prefix + str(k), v

    def show(v):
        if isinstance(v, (bool, str)) or v is None:
            return str(v)
        return f"{v:d}" if isinstance(v, (int, np.integer)) else f"{float(v):.6g}"

    rows = list(flat(metrics))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title] + [f"  {k:<{width}}  {show(v)}" for k, v in rows])
