"""Stage timings of a study: wall, process CPU and XLA compile seconds per stage (`StageClock.lap`)."""

from __future__ import annotations

import time

import jax

# Seconds spent tracing, lowering and compiling (XLA) since the first clock was made.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]
_listening = [False]


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


class StageClock:
    """`lap(name)` charges the time since the previous lap to stage `name`: `wall`, `cpu` and `compile` dicts."""

    def __init__(self):
        if not _listening[0]:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening[0] = True
        self.t0, self.cpu0, self.compile0 = time.perf_counter(), time.process_time(), _compile_seconds[0]
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.compile: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Ends stage `name` now."""
        self.wall[name] = time.perf_counter() - self.t0 - sum(self.wall.values())
        self.cpu[name] = time.process_time() - self.cpu0 - sum(self.cpu.values())
        self.compile[name] = _compile_seconds[0] - self.compile0 - sum(self.compile.values())

    def seconds(self) -> float:
        """Wall seconds since the clock was made."""
        return time.perf_counter() - self.t0
