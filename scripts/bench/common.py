"""Shared pieces of the benchmarks: machine description, a CPU-contention monitor, timing, and BENCHMARKS.md."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
BUSY_THRESHOLD = 0.10  # mean fraction of the machine used by other processes above which an entry says "busy"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() where there is none)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def num_cores() -> int:
    """Cores this process may run on (the affinity mask, which a container limits), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _busy_jiffies() -> int | None:
    try:
        fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait


def _own_cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class ContentionMonitor:
    """How much of the machine *other* processes used while a benchmark ran: (machine busy - our CPU) / capacity.

    /proc/stat counts every process on the (virtual) machine, getrusage counts this one and its waited-for
    children; the difference over the wall time and the core count is the share others took.
    """

    def __init__(self):
        self.cores = num_cores()
        self._t0, self._busy0, self._own0 = time.perf_counter(), _busy_jiffies(), _own_cpu_seconds()
        self.load_at_start = os.getloadavg()[0]

    def other_share(self) -> float | None:
        busy = _busy_jiffies()
        if busy is None or self._busy0 is None:
            return None
        wall = time.perf_counter() - self._t0
        machine = (busy - self._busy0) / os.sysconf("SC_CLK_TCK")
        others = machine - (_own_cpu_seconds() - self._own0)
        return max(0.0, others / (wall * max(os.cpu_count() or 1, 1)))

    def note(self) -> str:
        """A sentence for the entry: quiet or busy, with the numbers."""
        share = self.other_share()
        load = f"1-min load average {self.load_at_start:.2f} at start"
        if share is None:
            return f"Contention unknown (no /proc/stat); {load}."
        verdict = "BUSY: other processes competed for the CPU" if share > BUSY_THRESHOLD else "quiet"
        return f"Machine {verdict} ({share:.0%} of all cores used by other processes during the run; {load})."


def time_runs(fn: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `runs` calls of `fn` after `warmup` untimed ones; `fn` must block until its work is done."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table, columns padded so it also reads in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join(
        [fmt(cells[0]), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"] + [fmt(r) for r in cells[1:]]
    )


@dataclasses.dataclass
class Entry:
    """One BENCHMARKS.md section: what ran, where, with what, and the figures."""

    title: str
    command: str
    versions: dict[str, str]
    body: str  # tables and notes, markdown
    contention: str = ""

    def render(self) -> str:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines = [
            f"## {self.title} — {now}",
            "",
            f"- Command: `{self.command}`",
            f"- Machine: {cpu_model()}, {num_cores()} cores ({platform.system()} {platform.machine()})",
            f"- Versions: {versions}",
        ]
        if self.contention:
            lines.append(f"- Load: {self.contention}")
        return "\n".join(lines + ["", self.body.strip(), "", ""])


def record(entry: Entry, path: pathlib.Path = BENCHMARKS_MD) -> None:
    """Writes `entry` into BENCHMARKS.md in place of the section with the same title (or at the end: a new one)."""
    path = pathlib.Path(path)
    text = path.read_text() if path.exists() else "# Lumen benchmarks\n\n"
    sections = re.split(r"(?m)^(?=## )", text)
    same = [i for i, s in enumerate(sections) if s.startswith(f"## {entry.title} — ")]
    rendered = entry.render()
    if same:
        sections[same[0]] = rendered
        sections = [s for i, s in enumerate(sections) if i not in same[1:]]
    else:
        sections[-1] = sections[-1].rstrip("\n") + "\n\n"
        sections.append(rendered)
    path.write_text("".join(sections).rstrip("\n") + "\n")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The shell command that reran this benchmark (`python -m <module> <args>`), for its BENCHMARKS.md entry."""
    return shlex.join([".venv/bin/python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def publish(entry: Entry, *, append_to_file: bool) -> None:
    """Prints the entry and, unless told not to, writes it into BENCHMARKS.md (replacing that benchmark's section)."""
    print("\n" + entry.render())
    if append_to_file:
        record(entry)
        print(f"recorded in {BENCHMARKS_MD} (section '{entry.title}')")
