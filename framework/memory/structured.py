"""Stores that keep extracted facts: the fact store (mem0), core blocks + archival (MemGPT), the bi-temporal store.

Glossary: N items, D embedding width, K items asked for; t an event time ("valid time"), the time a row was
written or invalidated is its "transaction time" (`recorded_at`, `invalidated_at`).

Facts come from `extract(text) -> [ledger.Fact]` (the exact ledger grammar by default; mem0 uses an LLM here).

- `FactStore` (mem0): each extracted fact is compared with the active memory of the same key (the ledger's exact
  notion of "similar memory") and one decision is taken and logged: ADD (new key), UPDATE (new value: the old row
  is superseded, hidden but kept, pointing to its successor), DELETE ("drop": the row is hidden with reason
  "deleted"), NOOP (same value restated, or a drop of an unknown key). Retrieval: the k active facts nearest the
  query.
- `CoreArchivalStore` (MemGPT): a core block of "key = value" lines that is always in context, edited with the
  tools `core_append` / `core_replace` / `core_remove` (here called by a rule on each extracted fact, where MemGPT's
  LLM calls them itself); when the block exceeds `core_chars` its oldest lines are evicted (they stay findable in
  archival). Archival memory holds every utterance with its embedding, searched by `archival_search`. Retrieval:
  the core lines (score 2, not counted in k) then the k nearest archival items.
- `TemporalStore` (Zep/Graphiti, bi-temporal): a fact holds over [valid_from, valid_to) in event time. A new value
  closes the interval containing its time and opens its own (up to the next known interval, so late-arriving
  facts slot in); "drop" closes the interval. A row is never edited in place: closing an interval retires the row
  version (`invalidated_at` = the transaction time) and records a new version with the shorter interval, so stale
  facts are invalidated, never deleted or hidden. The transaction time of a write is the store's clock (the latest
  event time seen), so a late-arriving fact is recorded when it arrives. `retrieve(..., as_of=t)` returns only facts
  valid at t; `known_at=s` returns the row versions the store held at transaction time s.
"""

from __future__ import annotations

from collections.abc import Callable

from framework.memory.base import Event, Item, StoreBase, WriteResult, check_k, check_time
from framework.memory.embed import HashEmbedder
from framework.memory.ledger import Fact, extract_facts, fact_text

__all__ = ["CoreArchivalStore", "FactStore", "TemporalStore"]

Extractor = Callable[[str], list[Fact]]


class _FactStoreBase(StoreBase):
    def __init__(self, path, *, embedder=None, extract: Extractor = extract_facts, **kw):
        self.extract = extract
        super().__init__(path, embedder=embedder or HashEmbedder(), **kw)

    def _facts(self, event: Event) -> list[Fact]:
        facts = list(self.extract(event.text))
        for f in facts:
            if not isinstance(f, Fact) or (f.op != "drop" and f.value is None):
                raise ValueError(f"extract({event.text!r}) returned {f!r}; expected ledger.Fact with a value")
        return facts

    def _vecs(self, facts: list[Fact]) -> dict[str, object]:
        texts = sorted({fact_text(f.key, f.value) for f in facts if f.value is not None})
        return dict(zip(texts, self._embed(texts)))


class FactStore(_FactStoreBase):
    """mem0-style facts with ADD/UPDATE/DELETE/NOOP decisions (see module docstring)."""

    kind = "facts"

    def write(self, event: Event) -> WriteResult:
        """Extracts the event's facts and applies one logged decision per fact, in one transaction."""
        event = self._check_event(event)
        facts = self._facts(event)
        vecs = self._vecs(facts)
        t = float(event.time)
        with self.db.transaction():
            ids, decisions = [], []
            for f in facts:
                cur = self.db.query(
                    "SELECT id, text FROM items WHERE kind = 'fact' AND key = ? AND status = 'active' "
                    "ORDER BY id DESC LIMIT 1",
                    (f.key,),
                )
                if f.op == "drop":
                    if cur:
                        self._hide([cur[0][0]], "deleted", t)
                        decisions.append(self._decide("DELETE", f.key, cur[0][0], t))
                    else:
                        decisions.append(self._decide("NOOP", f.key, None, t, "drop of an unknown key"))
                    continue
                text = fact_text(f.key, f.value)
                if cur and cur[0][1] == text:
                    decisions.append(self._decide("NOOP", f.key, cur[0][0], t))
                    continue
                new = self._insert("fact", text, event, key=f.key, valid_from=t, vec_D=vecs[text])
                ids.append(new)
                if cur:
                    self._hide([cur[0][0]], "superseded", t, superseded_by=new)
                    decisions.append(self._decide("UPDATE", f.key, new, t, f"supersedes {cur[0][0]}"))
                else:
                    decisions.append(self._decide("ADD", f.key, new, t))
            self._advance(t)
            self._enforce_capacity(t)
        return WriteResult(tuple(ids), tuple(decisions))

    def retrieve(self, query: str, k: int, *, now: float | None = None) -> list[Item]:
        """The k active facts nearest `query`, best first (score = cosine similarity)."""
        self._check_text(query, "query")
        k = check_k(k)
        now = self._now(now)
        vis, args = self._visible_sql(now)
        items = [self._item(r, s) for r, s in self._ranked(self._embed([query])[0], k, vis, args)]
        self._touch([i.id for i in items], now)
        return items


class TemporalStore(_FactStoreBase):
    """Bi-temporal facts: validity intervals, invalidated never deleted, "as of" queries (see module docstring)."""

    kind = "temporal"
    time_query = "as_of"
    _CURRENT = "kind = 'fact' AND key = ? AND status = 'active' AND invalidated_at IS NULL"

    def _close(self, row_id: int, end: float, tx: float, event: Event) -> None:
        """Retires row version `row_id` at transaction time `tx` and records it again with valid_to = `end`."""
        vf, text, key, time, session = self.db.query(
            "SELECT valid_from, text, key, time, session FROM items WHERE id = ?", (row_id,)
        )[0]
        self.db.execute("UPDATE items SET invalidated_at = ? WHERE id = ?", (tx, row_id))
        if end > vf:  # an empty interval (changed again the same day) is kept only as the retired version
            vec_D = self.db.get_vectors([row_id])[0]
            copy = self._insert(
                "fact",
                text,
                Event(text, time, session),
                key=key,
                valid_from=vf,
                valid_to=end,
                vec_D=vec_D,
                recorded_at=tx,
            )
            self.db.execute("UPDATE items SET superseded_by = ? WHERE id = ?", (copy, row_id))

    def write(self, event: Event) -> WriteResult:
        """Closes and opens validity intervals for the event's facts, in one transaction."""
        event = self._check_event(event)
        facts = self._facts(event)
        vecs = self._vecs(facts)
        t = float(event.time)
        with self.db.transaction():
            tx = max(self.clock, t)  # transaction time: a late-arriving fact is recorded when it arrives
            ids, decisions = [], []
            for f in facts:
                cur = self.db.query(
                    f"SELECT id, text FROM items WHERE {self._CURRENT} AND valid_from <= ? "
                    "AND (valid_to IS NULL OR valid_to > ?) ORDER BY valid_from DESC, id DESC LIMIT 1",
                    (f.key, t, t),
                )
                if f.op == "drop":
                    if cur:
                        self._close(cur[0][0], t, tx, event)
                        decisions.append(self._decide("DELETE", f.key, cur[0][0], t, "interval closed"))
                    else:
                        decisions.append(self._decide("NOOP", f.key, None, t, "drop of an unknown key"))
                    continue
                text = fact_text(f.key, f.value)
                if cur and cur[0][1] == text:
                    decisions.append(self._decide("NOOP", f.key, cur[0][0], t))
                    continue
                nxt = self.db.query(
                    f"SELECT MIN(valid_from) FROM items WHERE {self._CURRENT} AND valid_from > ?", (f.key, t)
                )[0][0]
                if cur:
                    self._close(cur[0][0], t, tx, event)
                new = self._insert(
                    "fact", text, event, key=f.key, valid_from=t, valid_to=nxt, vec_D=vecs[text], recorded_at=tx
                )
                ids.append(new)
                decisions.append(self._decide("UPDATE" if cur else "ADD", f.key, new, t))
            self._advance(t)
            self._enforce_capacity(t)
        return WriteResult(tuple(ids), tuple(decisions))

    def retrieve(
        self, query: str, k: int, *, as_of: float | None = None, known_at: float | None = None, now: float | None = None
    ) -> list[Item]:
        """The k facts nearest `query` (with their intervals); `as_of`: only facts valid then; `known_at`: as the
        store held them at that transaction time."""
        self._check_text(query, "query")
        k = check_k(k)
        now = self._now(now)
        where, args = self._visible_sql(now)
        if known_at is None:
            where += " AND invalidated_at IS NULL"
        else:
            where += " AND recorded_at <= ? AND (invalidated_at IS NULL OR invalidated_at > ?)"
            args += (check_time(known_at, "known_at"),) * 2
        if as_of is not None:
            where += " AND valid_from <= ? AND (valid_to IS NULL OR valid_to > ?)"
            args += (check_time(as_of, "as_of"),) * 2
        items = [self._item(r, s) for r, s in self._ranked(self._embed([query])[0], k, where, args)]
        self._touch([i.id for i in items], now)
        return items

    def history(self, key: str) -> list[Item]:
        """The current record of `key`: every interval it held a value, in valid-time order."""
        rows = self._rows("kind = 'fact' AND key = ? AND invalidated_at IS NULL", (key,), order="valid_from, id")
        return [self._item(r, 1.0) for r in rows]


class CoreArchivalStore(_FactStoreBase):
    """MemGPT-style core block (always in context, self-edited) + archival memory (see module docstring)."""

    kind = "core_archival"
    BLOCK = "human"

    def __init__(self, path, *, core_chars: int = 400, **kw):
        if isinstance(core_chars, bool) or int(core_chars) <= 0:
            raise ValueError(f"core_chars = {core_chars!r}; expected a positive block size in characters")
        super().__init__(path, **kw)
        with self.db.transaction():
            self.db.execute("INSERT OR IGNORE INTO blocks VALUES (?, '', ?)", (self.BLOCK, int(core_chars)))
        self.core_chars = int(self.db.query("SELECT char_limit FROM blocks WHERE name = ?", (self.BLOCK,))[0][0])

    # ---- the tools (MemGPT's function calls) ----
    def core(self) -> list[str]:
        """The core block's lines."""
        text = self.db.query("SELECT text FROM blocks WHERE name = ?", (self.BLOCK,))[0][0]
        return [line for line in text.split("\n") if line]

    def _set_core(self, lines: list[str], t: float) -> None:
        while lines and len("\n".join(lines)) > self.core_chars:
            self._decide("CORE_EVICT", None, None, t, lines.pop(0))
        self.db.execute("UPDATE blocks SET text = ? WHERE name = ?", ("\n".join(lines), self.BLOCK))

    def core_append(self, line: str, *, time: float = 0.0) -> None:
        """Appends a line to the core block (evicting its oldest lines past `core_chars`)."""
        self._check_text(line, "line")
        with self.db.transaction():
            self._set_core(self.core() + [line], time)

    def core_replace(self, old: str, new: str, *, time: float = 0.0) -> None:
        """Replaces the core line `old` with `new` (ValueError if `old` is not a line of the block)."""
        self._check_text(new, "new")
        with self.db.transaction():
            lines = self.core()
            if old not in lines:
                raise ValueError(f"old = {old!r} is not a line of the core block {lines}")
            self._set_core([new if line == old else line for line in lines], time)

    def core_remove(self, line: str, *, time: float = 0.0) -> None:
        """Removes a line from the core block (nothing if absent)."""
        with self.db.transaction():
            self._set_core([x for x in self.core() if x != line], time)

    def archival_search(self, query: str, k: int, *, now: float | None = None) -> list[Item]:
        """The k visible archival items nearest `query`, best first."""
        self._check_text(query, "query")
        k = check_k(k)
        now = self._now(now)
        vis, args = self._visible_sql(now)
        return [self._item(r, s) for r, s in self._ranked(self._embed([query])[0], k, vis, args)]

    # ---- the store protocol ----
    def write(self, event: Event) -> WriteResult:
        """Archives the utterance and edits the core block from its facts, in one transaction."""
        event = self._check_event(event)
        facts = self._facts(event)
        vec_D = self._embed([event.text])[0]
        t = float(event.time)
        with self.db.transaction():
            item = self._insert("event", event.text, event, vec_D=vec_D)
            decisions = []
            for f in facts:
                lines = self.core()
                old = [x for x in lines if x.startswith(f"{f.key} = ")]
                if f.op == "drop":
                    self._set_core([x for x in lines if x not in old], t)
                    decisions.append(self._decide("CORE_REMOVE" if old else "NOOP", f.key, item, t))
                    continue
                line = fact_text(f.key, f.value)
                if old == [line]:
                    decisions.append(self._decide("NOOP", f.key, item, t))
                    continue
                self._set_core([x for x in lines if x not in old] + [line], t)
                decisions.append(self._decide("CORE_REPLACE" if old else "CORE_APPEND", f.key, item, t))
            self._advance(t)
            self._enforce_capacity(t)
        return WriteResult((item,), tuple(decisions))

    def retrieve(self, query: str, k: int, *, now: float | None = None) -> list[Item]:
        """The core lines (score 2, always included, not counted in k) then the k nearest archival items."""
        core = [Item(0, line, 2.0, self.clock, "core") for line in self.core()]
        found = self.archival_search(query, k, now=now)
        self._touch([i.id for i in found], self._now(now))
        return core + found
