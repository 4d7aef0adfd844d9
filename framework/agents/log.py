"""The append-only message log of a multi-agent run, in A2A's record shapes, with replay and resume.

A run is an A2A context (`contextId` = the run id). Each problem is an A2A task (`taskId` = "p<i>") whose life is
recorded as `status-update` events (submitted -> working -> completed | failed), whose agents' replies are
`message` records (role "agent", parts: a text part with the reply and a data part with who wrote it, in which
phase, the parsed value, token and FLOP counts and any failure) and whose result is an `artifact-update` (the
final answer). Tool calls are messages too (a data part with the tool, its arguments and result or error).

Phases: the runner writes every message of a phase (one batched round of generation or of tool calls) and then a
commit record, a `status-update` of the run task whose metadata names the phase. A rerun on the same log takes the
messages of committed phases from the log instead of generating them; a phase interrupted before its commit is
generated again (its rows draw from per-row keys, so the second attempt writes the same texts). A final line cut
off by a crash is ignored when the log is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

TASK_STATES = ("submitted", "working", "input-required", "completed", "canceled", "failed", "rejected", "unknown")


def message_record(context_id: str, task_id: str, message_id: str, text: str, data: Mapping[str, Any]) -> dict:
    """An A2A agent Message: a text part (the reply) and a data part (its metadata)."""
    return {
        "kind": "message",
        "role": "agent",
        "messageId": message_id,
        "taskId": task_id,
        "contextId": context_id,
        "parts": [{"kind": "text", "text": text}, {"kind": "data", "data": dict(data)}],
    }


def status_record(context_id: str, task_id: str, state: str, *, final: bool = False, metadata=None) -> dict:
    """An A2A TaskStatusUpdateEvent."""
    if state not in TASK_STATES:
        raise ValueError(f"state = {state!r}; expected one of {TASK_STATES}")
    rec = {"kind": "status-update", "taskId": task_id, "contextId": context_id, "status": {"state": state}}
    rec["final"] = bool(final)
    if metadata:
        rec["metadata"] = dict(metadata)
    return rec


def artifact_record(context_id: str, task_id: str, name: str, data: Mapping[str, Any]) -> dict:
    """An A2A TaskArtifactUpdateEvent holding one data part."""
    return {
        "kind": "artifact-update",
        "taskId": task_id,
        "contextId": context_id,
        "artifact": {"artifactId": f"{task_id}/{name}", "name": name, "parts": [{"kind": "data", "data": dict(data)}]},
    }


def message_text(record: Mapping[str, Any]) -> str:
    """The text part of a message record."""
    return next(p["text"] for p in record["parts"] if p["kind"] == "text")


def message_data(record: Mapping[str, Any]) -> dict:
    """The data part of a message record."""
    return next(p["data"] for p in record["parts"] if p["kind"] == "data")


class MessageLog:
    """Append-only JSONL log (or in memory when `path` is None); reopening a path continues the same log."""

    def __init__(self, path: str | os.PathLike | None = None, context_id: str = "run"):
        self.path, self.context_id = path, context_id
        self.records: list[dict] = []
        if path is not None and os.path.exists(path):
            self.records = read_records(path)
        self._file = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if self.records:  # rewrite without a torn last line, so appends start on a fresh line
                with open(path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in self.records)
            self._file = open(path, "a")

    def append(self, record: Mapping[str, Any]) -> None:
        """Adds a record (and writes it through to the file)."""
        self.records.append(dict(record))
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Closes the file (the records stay readable in memory)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def committed(self, phase: str) -> dict[str, dict] | None:
        """Messages of a committed phase by messageId (the last record of each id wins), None if not committed."""
        done = any(
            r["kind"] == "status-update" and r.get("metadata", {}).get("phase") == phase and r["taskId"] == "run"
            for r in self.records
        )
        if not done:
            return None
        out = {}
        for r in self.records:
            if r["kind"] == "message" and message_data(r).get("phase") == phase:
                out[r["messageId"]] = r
        return out

    def messages(self) -> list[dict]:
        """Every message record in order."""
        return [r for r in self.records if r["kind"] == "message"]

    def has_final(self) -> bool:
        """Whether the run's final status was written."""
        return any(r["kind"] == "status-update" and r["taskId"] == "run" and r.get("final") for r in self.records)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a log file; a last line cut off mid-write is dropped, any other bad line is an error."""
    with open(path) as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2 and not any(x.strip() for x in lines[i + 1 :]):
                break  # the torn last line of an interrupted write
            raise ValueError(f"message log {path}: line {i + 1} is not JSON") from None
    return out
