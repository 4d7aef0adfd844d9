"""The memory-store protocol, events and retrieved items, forget policies, and the machinery every store shares.

Glossary: N items, D embedding width, K items asked for.

A store takes `write(event)` (one utterance with its time), answers `retrieve(query, k) -> [Item]` (the k best
visible items with scores, best first) and applies `forget(policy)`. Every store keeps its items in one SQLite file
(`db.MemoryDB`), or in any `db.Backend` passed instead of the path (e.g. `pg.PostgresDB`): rows are never deleted
by a policy, only hidden (`status` != "active", with the reason and time), so an audit (`store.audit()`) still
sees every memory ever written.

Write policies (constructor arguments of every store): `ttl` gives each item an expiry time (its time + ttl): from
then on retrieval hides it (the row stays); `capacity` bounds the visible items: a write beyond it evicts the
least-used ones (fewest retrievals, then least recently used, then oldest). Forget policies (`store.forget(...)`):
`TTL(ttl)`, `Capacity(max_items)`, `Supersede(key=... | item_ids=...)` (explicit invalidation, e.g. "this fact is
stale") and `Delete(item_ids=...)` (explicit forgetting); each hides rows with its reason and returns how many.

Every text that enters a store (events and queries) is checked against the store's tokenizer (the text tokenizer by
default: what the answerer reads), so a character it lacks is a ValueError naming the character and the argument,
before anything is written. A write is one transaction: the item, its embedding, its links and its decisions land
together or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from framework.memory.db import MemoryDB, MemoryDBError
from framework.tasks.tokenizer import TEXT_TOKENIZER

__all__ = [
    "Capacity",
    "Delete",
    "Event",
    "Item",
    "MemoryStore",
    "StoreBase",
    "Supersede",
    "TTL",
    "WriteResult",
    "check_k",
    "check_time",
]

HIDDEN_REASONS = ("expired", "evicted", "superseded", "deleted")


@dataclasses.dataclass(frozen=True)
class Event:
    """One utterance: its text, when it was said (a float, e.g. a day), its session and speaker."""

    text: str
    time: float
    session: int = 0
    speaker: str = "user"


@dataclasses.dataclass(frozen=True)
class Item:
    """A retrieved memory: row id, text, score (higher is better), time, kind, key and validity interval."""

    id: int
    text: str
    score: float
    time: float
    kind: str
    key: str | None = None
    valid_from: float | None = None
    valid_to: float | None = None
    status: str = "active"

    def render(self) -> str:
        """The line the reader sees: "day 3: set kobu to 12." for events, "day 3-7: kobu = 12" for facts.

        A fact's validity comes before its value, as an event's day does: a reader reading left to right (a causal
        LM) has seen whether the value still holds by the time it reads the value.
        """
        if self.kind in ("fact", "core"):
            lo = "?" if self.valid_from is None else f"{self.valid_from:g}"
            hi = "now" if self.valid_to is None else f"{self.valid_to:g}"
            return f"day {lo}-{hi}: {self.text}" if self.kind == "fact" else f"core: {self.text}"
        return f"day {self.time:g}: {self.text}"


@dataclasses.dataclass(frozen=True)
class WriteResult:
    """What a write did: the new item ids and the decisions taken, e.g. [("UPDATE", "kobu", 7)]."""

    item_ids: tuple[int, ...] = ()
    decisions: tuple[tuple[str, str | None, int | None], ...] = ()


@dataclasses.dataclass(frozen=True)
class TTL:
    """Hide items whose time is more than `ttl` before `now`."""

    ttl: float


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Keep at most `max_items` visible: hide the least-used (fewest uses, least recent use, oldest) beyond it."""

    max_items: int


@dataclasses.dataclass(frozen=True)
class Supersede:
    """Mark the active items of `key` (or the given item ids) as superseded: hidden from retrieval, kept."""

    key: str | None = None
    item_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Delete:
    """Explicitly forget the given items (hidden with reason "deleted", kept for audit)."""

    item_ids: tuple[int, ...] = ()


@runtime_checkable
class MemoryStore(Protocol):
    """What the harness and an agent need from a memory store."""

    name: str

    def write(self, event: Event) -> WriteResult:
        """Stores one utterance (and whatever the store derives from it) in one transaction."""
        ...

    def retrieve(self, query: str, k: int) -> list[Item]:
        """The k best visible items for `query`, best first (k > 0)."""
        ...

    def forget(self, policy, *, now: float | None = None) -> int:
        """Applies a forget policy; returns how many items it hid."""
        ...

    def close(self) -> None: ...


def check_k(k) -> int:
    """k as an int, or ValueError unless it is a positive integer."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) <= 0:
        raise ValueError(f"k = {k!r}; expected a positive integer number of items to retrieve")
    return int(k)


def check_time(t, arg: str) -> float:
    """A time bound (`until`, `as_of`, `known_at`) as a float, or ValueError unless it is a finite number."""
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not np.isfinite(t):
        raise ValueError(f"{arg} = {t!r}; expected a finite number (an event time)")
    return float(t)


_COLUMNS = "id, text, time, kind, key, valid_from, valid_to, status"


class StoreBase:
    """Shared machinery: the file, text checks, inserting, hiding, policies, use counts and the audit view."""

    kind = "base"
    # How a question about a past time narrows this store's retrieval (`harness.ask(..., time_aware=True)`):
    # "until" (only memories from events at or before it), "as_of" (only facts valid then), or None.
    time_query: str | None = None

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        embedder=None,
        tokenizer=TEXT_TOKENIZER,
        ttl: float | None = None,
        capacity: int | None = None,
        synchronous: str = "NORMAL",
        migrate: bool = False,
    ):
        if ttl is not None and not float(ttl) > 0:
            raise ValueError(f"ttl = {ttl!r}; expected None or a positive duration")
        if capacity is not None and (isinstance(capacity, bool) or int(capacity) <= 0):
            raise ValueError(f"capacity = {capacity!r}; expected None or a positive number of items")
        self.ttl = None if ttl is None else float(ttl)
        self.capacity = None if capacity is None else int(capacity)
        self.embedder, self.tokenizer = embedder, tokenizer
        self.name = self.kind
        dim = getattr(embedder, "dim", None)
        if isinstance(path, (str, os.PathLike)):
            self.db = MemoryDB(path, store_kind=self.kind, embed_dim=dim, synchronous=synchronous, migrate=migrate)
        elif all(hasattr(path, m) for m in ("transaction", "execute", "query", "knn", "close")):
            self.db = path  # another `db.Backend` (e.g. `pg.PostgresDB`), opened by the caller
            if path.store_kind != self.kind or (dim or None) != path.embed_dim:
                raise MemoryDBError(
                    f"backend {path.path!r} holds a {path.store_kind!r} store of width {path.embed_dim}, opened as "
                    f"{self.kind!r} with width {dim}"
                )
        else:
            raise ValueError(f"path = {path!r}; expected a file path or a framework.memory.db.Backend")
        if embedder is not None:
            with self.db.transaction():
                got = self.db.query("SELECT value FROM meta WHERE key = 'embedder'")
                if not got:
                    self.db.execute("INSERT INTO meta VALUES ('embedder', ?)", (embedder.name,))
            if got and got[0][0] != embedder.name:
                self.db.close()
                raise MemoryDBError(
                    f"memory store {self.db.path!r} was written with embedder {got[0][0]!r}, opened with "
                    f"{embedder.name!r}: retrievals would be meaningless"
                )

    # ---- checks ----
    def _check_text(self, text, arg: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{arg} = {text!r}; expected a non-empty string")
        try:
            self.tokenizer.encode(text)
        except ValueError as err:
            raise ValueError(f"{arg}: {err}") from None
        return text

    def _check_event(self, event: Event) -> Event:
        if not isinstance(event, Event):
            raise ValueError(f"event = {event!r}; expected a framework.memory.Event")
        if not np.isfinite(float(event.time)):
            raise ValueError(f"event.time = {event.time!r}; expected a finite number")
        self._check_text(event.text, "event.text")
        return event

    # ---- clock ----
    @property
    def clock(self) -> float:
        """The latest event time written (the default `now` for expiry and policies); -inf when empty."""
        row = self.db.query("SELECT value FROM meta WHERE key = 'clock'")
        return float(row[0][0]) if row else float("-inf")

    def _advance(self, t: float) -> None:
        self.db.execute(
            "INSERT INTO meta VALUES ('clock', ?) ON CONFLICT(key) DO UPDATE SET value = "
            "CAST(MAX(CAST(value AS REAL), CAST(excluded.value AS REAL)) AS TEXT)",
            (repr(float(t)),),
        )

    # ---- rows ----
    def _insert(
        self,
        kind: str,
        text: str,
        event: Event,
        *,
        key=None,
        valid_from=None,
        valid_to=None,
        meta: dict | None = None,
        vec_D: np.ndarray | None = None,
        recorded_at: float | None = None,
    ) -> int:
        expires = None if self.ttl is None else float(event.time) + self.ttl
        recorded_at = float(event.time) if recorded_at is None else float(recorded_at)
        item_id = self.db.execute(
            "INSERT INTO items (kind, key, text, time, session, recorded_at, valid_from, valid_to, expires_at, meta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                kind,
                key,
                text,
                float(event.time),
                int(event.session),
                recorded_at,
                valid_from,
                valid_to,
                expires,
                json.dumps(meta or {}),
            ),
        )
        if vec_D is not None:
            self.db.put_vector(item_id, vec_D)
        return item_id

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of `texts` (computed before a write's transaction, so the write lock is held briefly)."""
        return self.embedder(list(texts)) if texts else np.zeros((0, self.embedder.dim), np.float32)

    def _ranked(self, query_D: np.ndarray, k: int, where: str, args: tuple) -> list[tuple[tuple, float]]:
        """The k nearest items (exact search) that satisfy the SQL condition `where`: [(row, similarity)].

        The vector table is searched for 4k, 16k, ... neighbours until k of them pass `where` or it is exhausted.
        """
        want = 4 * k
        while True:
            hits = self.db.knn(query_D, want)
            ok = self._filter([i for i, _ in hits], where, args)
            out = [(ok[i], 1.0 - d) for i, d in hits if i in ok]
            if len(out) >= k or len(hits) < want:
                return out[:k]
            want *= 4

    def _filter(self, ids: Sequence[int], where: str, args: tuple) -> dict[int, tuple]:
        out: dict[int, tuple] = {}
        for lo in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[lo : lo + 500]]
            marks = ",".join("?" * len(chunk))
            for row in self._rows(f"id IN ({marks}) AND {where}", tuple(chunk) + tuple(args)):
                out[int(row[0])] = row
        return out

    def _decide(self, op: str, key: str | None, item_id: int | None, time: float, detail: str = "") -> tuple:
        self.db.execute(
            "INSERT INTO decisions (time, op, key, item_id, detail) VALUES (?, ?, ?, ?, ?)",
            (float(time), op, key, item_id, detail),
        )
        return (op, key, item_id)

    def _hide(self, ids: Sequence[int], reason: str, now: float, superseded_by: int | None = None) -> int:
        assert reason in HIDDEN_REASONS, reason
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        self.db.executemany(
            "UPDATE items SET status = ?, hidden_reason = ?, hidden_at = ?, superseded_by = ? WHERE id = ?",
            [("hidden", reason, float(now), superseded_by, i) for i in ids],
        )
        self.db.set_vector_active(ids, False)
        return len(ids)

    def _visible_sql(self, now: float, until: float | None = None) -> tuple[str, tuple]:
        """The SQL condition for items visible at `now` (not hidden, not expired); `until`: and no later than it."""
        where, args = "status = 'active' AND (expires_at IS NULL OR expires_at > ?)", (float(now),)
        if until is not None:
            where, args = where + " AND time <= ?", args + (check_time(until, "until"),)
        return where, args

    def _rows(self, where: str, args: tuple = (), order: str = "time, id") -> list[tuple]:
        return self.db.query(f"SELECT {_COLUMNS} FROM items WHERE {where} ORDER BY {order}", args)

    @staticmethod
    def _item(row: tuple, score: float) -> Item:
        i, text, t, kind, key, vf, vt, status = row
        return Item(int(i), text, float(score), float(t), kind, key, vf, vt, status)

    def _touch(self, ids: Sequence[int], now: float) -> None:
        """Counts a use of each retrieved item (what least-used eviction reads)."""
        if ids:
            with self.db.transaction():
                self.db.executemany(
                    "UPDATE items SET uses = uses + 1, last_used = ? WHERE id = ?", [(float(now), int(i)) for i in ids]
                )

    def _now(self, now: float | None) -> float:
        return self.clock if now is None else float(now)

    def _enforce_capacity(self, now: float) -> None:
        if self.capacity is not None:
            self._apply(Capacity(self.capacity), now)

    # ---- forgetting ----
    def _apply(self, policy, now: float) -> int:
        vis, args = self._visible_sql(now)
        if isinstance(policy, TTL):
            if not float(policy.ttl) > 0:
                raise ValueError(f"TTL.ttl = {policy.ttl!r}; expected a positive duration")
            rows = self.db.query(f"SELECT id FROM items WHERE {vis} AND time < ?", args + (now - policy.ttl,))
            return self._hide([r[0] for r in rows], "expired", now)
        if isinstance(policy, Capacity):
            if isinstance(policy.max_items, bool) or int(policy.max_items) <= 0:
                raise ValueError(f"Capacity.max_items = {policy.max_items!r}; expected a positive integer")
            rows = self.db.query(
                f"SELECT id FROM items WHERE {vis} ORDER BY uses DESC, COALESCE(last_used, -1e300) DESC, time DESC, "
                f"id DESC LIMIT -1 OFFSET ?",
                args + (int(policy.max_items),),
            )
            return self._hide([r[0] for r in rows], "evicted", now)
        if isinstance(policy, Supersede):
            if policy.key is None and not policy.item_ids:
                raise ValueError("Supersede: give key= or item_ids=")
            ids = [int(i) for i in policy.item_ids]
            if policy.key is not None:
                ids += [
                    r[0] for r in self.db.query(f"SELECT id FROM items WHERE {vis} AND key = ?", args + (policy.key,))
                ]
            return self._hide(ids, "superseded", now)
        if isinstance(policy, Delete):
            known = {r[0] for r in self.db.query("SELECT id FROM items WHERE status = 'active'")}
            missing = [i for i in policy.item_ids if int(i) not in known]
            if missing:
                raise ValueError(f"Delete.item_ids: {missing} are not active items of {self.db.path!r}")
            return self._hide(policy.item_ids, "deleted", now)
        raise ValueError(f"policy = {policy!r}; expected TTL, Capacity, Supersede or Delete")

    def forget(self, policy, *, now: float | None = None) -> int:
        """Applies a forget policy (TTL, Capacity, Supersede, Delete) in one transaction; returns items hidden."""
        with self.db.transaction():
            return self._apply(policy, self._now(now))

    # ---- views ----
    def audit(self) -> list[dict[str, Any]]:
        """Every item ever written, hidden ones included, with status, reason and use counts (oldest first)."""
        rows = self.db.query(
            "SELECT id, kind, key, text, time, status, hidden_reason, hidden_at, superseded_by, valid_from, valid_to, "
            "expires_at, uses FROM items ORDER BY id"
        )
        names = (
            "id",
            "kind",
            "key",
            "text",
            "time",
            "status",
            "hidden_reason",
            "hidden_at",
            "superseded_by",
            "valid_from",
            "valid_to",
            "expires_at",
            "uses",
        )
        return [dict(zip(names, r)) for r in rows]

    def decisions(self) -> list[tuple[str, str | None, int | None]]:
        """The write decisions taken so far, in order: (op, key, item_id)."""
        return [tuple(r) for r in self.db.query("SELECT op, key, item_id FROM decisions ORDER BY id")]

    def __len__(self) -> int:
        vis, args = self._visible_sql(self.clock)
        return int(self.db.query(f"SELECT COUNT(*) FROM items WHERE {vis}", args)[0][0])

    def close(self) -> None:
        """Closes the store's file."""
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
