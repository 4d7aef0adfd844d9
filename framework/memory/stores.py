"""Stores that keep the utterances themselves: full context, recent window, vector store, linked notes (A-MEM).

Glossary: N items, D embedding width, K items asked for.

- `FullContextStore`: every visible utterance, oldest first; the whole history is the context (k is checked but
  does not bound it: a reader with a finite window truncates, which is how full context degrades with length).
- `RecentWindowStore(window=W)`: the last min(W, k) visible utterances.
- `VectorStore(embedder, index="exact" | "approx")`: the k visible utterances nearest the query by cosine
  similarity of their embeddings; exact search is sqlite-vec's `vec0` KNN, "approx" a usearch HNSW index
  (`ann.ApproxIndex`) kept beside the file.
- `LinkedNotesStore(embedder, links=3)` (A-MEM): each utterance becomes a note with keywords; a new note links to
  its most similar earlier notes that share a keyword, and those notes evolve (they take in the new note's
  keywords as tags). Retrieval takes the nearest notes and spreads to their linked neighbours (score: the hit's
  similarity times the link weight, halved), best first.

Each write is one transaction; each retrieval counts a use of every item it returns (least-used eviction).
`retrieve(..., until=t)` keeps to memories of events at or before t (LongMemEval's time-aware query: a question
about day t searches what was said by then).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

from framework.memory.ann import ApproxIndex
from framework.memory.base import Event, Item, StoreBase, WriteResult, check_k
from framework.memory.db import MemoryDB
from framework.memory.embed import HashEmbedder

__all__ = ["FullContextStore", "LinkedNotesStore", "RecentWindowStore", "VectorStore"]

_STOPWORDS = frozenset(
    "set change to is still drop the a an and or of in on for it at be was what remember check later now day".split()
)


class _EventStore(StoreBase):
    """A store whose items are the utterances: write = one row (+ its embedding when the store has an embedder)."""

    time_query = "until"

    def write(self, event: Event) -> WriteResult:
        """Stores one utterance in one transaction (then evicts beyond `capacity`, if set)."""
        return self.write_many([event])

    def write_many(self, events: Sequence[Event], vectors_ND: np.ndarray | None = None) -> WriteResult:
        """Stores utterances in one transaction; `vectors_ND` gives their embeddings (else the embedder's)."""
        events = [self._check_event(e) for e in events]
        if not events:
            return WriteResult()
        vecs = None
        if self.embedder is not None:
            vecs = self._embed([e.text for e in events]) if vectors_ND is None else np.asarray(vectors_ND, np.float32)
        with self.db.transaction():
            ids = []
            for e in events:
                ids.append(self._insert("event", e.text, e))
            if vecs is not None:
                self.db.put_vectors(ids, vecs)
            self._advance(max(e.time for e in events))
            self._enforce_capacity(max(e.time for e in events))
        self._after_write(ids, vecs)
        return WriteResult(tuple(ids))

    def _after_write(self, ids, vecs) -> None:
        pass


class FullContextStore(_EventStore):
    """Every visible utterance, oldest first (see module docstring)."""

    kind = "full_context"

    def retrieve(self, query: str, k: int, *, now: float | None = None, until: float | None = None) -> list[Item]:
        """All visible items (from events at or before `until`, if given), oldest first (score 1); `k` must be
        positive but does not bound the result."""
        self._check_text(query, "query")
        check_k(k)
        vis, args = self._visible_sql(self._now(now), until)
        items = [self._item(r, 1.0) for r in self._rows(vis, args)]
        self._touch([i.id for i in items], self._now(now))
        return items


class RecentWindowStore(_EventStore):
    """The last min(window, k) visible utterances (see module docstring)."""

    kind = "recent_window"

    def __init__(self, path, *, window: int = 16, **kw):
        if isinstance(window, bool) or int(window) <= 0:
            raise ValueError(f"window = {window!r}; expected a positive number of utterances")
        self.window = int(window)
        super().__init__(path, **kw)

    def retrieve(self, query: str, k: int, *, now: float | None = None, until: float | None = None) -> list[Item]:
        """The most recent min(window, k) visible items (at or before `until`, if given), newest first (score
        1 / (1 + age rank))."""
        self._check_text(query, "query")
        n = min(check_k(k), self.window)
        vis, args = self._visible_sql(self._now(now), until)
        rows = self._rows(vis, args, order=f"time DESC, id DESC LIMIT {int(n)}")
        items = [self._item(r, 1.0 / (1 + j)) for j, r in enumerate(rows)]
        self._touch([i.id for i in items], self._now(now))
        return items


class VectorStore(_EventStore):
    """The k visible utterances nearest the query (exact sqlite-vec or approximate usearch; see module docstring)."""

    kind = "vector"

    def __init__(self, path, *, embedder=None, index: str = "exact", ann_settings: dict | None = None, **kw):
        if index not in ("exact", "approx"):
            raise ValueError(f"index = {index!r}; expected 'exact' or 'approx'")
        super().__init__(path, embedder=embedder or HashEmbedder(), **kw)
        self.index_kind = index
        if index == "approx" and not isinstance(self.db, MemoryDB):
            self.db.close()
            raise ValueError(
                "index = 'approx' keeps a usearch file beside a SQLite store; this backend's knn is its own"
            )
        self.ann = None
        if index == "approx":
            settings = ann_settings or {}
            self._ann_path = self.db.path + ".usearch"
            self.ann = ApproxIndex.load(self._ann_path, self.embedder.dim, **settings)
            if self.ann is None:
                self.ann = ApproxIndex(self.embedder.dim, **settings)
            self._sync_ann()

    def _sync_ann(self) -> None:
        """Adds every vector row newer than the index's largest id (the database is the source of truth)."""
        ids_N, x_ND = self.db.vectors_after(self.ann.max_id)
        self.ann.add(ids_N, x_ND)

    def _after_write(self, ids, vecs) -> None:
        if self.ann is not None:
            self._sync_ann()

    def retrieve(self, query: str, k: int, *, now: float | None = None, until: float | None = None) -> list[Item]:
        """The k visible items most similar to `query` (among those at or before `until`, if given), best first
        (score = cosine similarity)."""
        self._check_text(query, "query")
        k = check_k(k)
        q_D = self._embed([query])[0]
        return self.retrieve_vector(q_D, k, now=now, until=until)

    def retrieve_vector(
        self, q_D: np.ndarray, k: int, *, now: float | None = None, until: float | None = None
    ) -> list[Item]:
        """Like `retrieve`, from a query embedding."""
        k = check_k(k)
        now = self._now(now)
        vis, args = self._visible_sql(now, until)
        if self.ann is None:
            found = self._ranked(q_D, k, vis, args)
        else:
            self._sync_ann()
            want = 2 * k
            while True:
                hits = self.ann.search(q_D, want)
                ok = self._filter([i for i, _ in hits], vis, args)
                found = [(ok[i], 1.0 - d) for i, d in hits if i in ok]
                if len(found) >= k or len(hits) < want:
                    break
                want *= 4
            found = found[:k]
        items = [self._item(r, s) for r, s in found]
        self._touch([i.id for i in items], now)
        return items

    def close(self) -> None:
        """Saves the approximate index (a cache) beside the file, then closes it."""
        if self.ann is not None:
            self.ann.save(self._ann_path)
        super().close()


def keywords(text: str) -> list[str]:
    """The words of a note that link it to others: lowercase words of 3+ letters, minus the ledger's verbs."""
    return sorted({w for w in re.findall(r"[a-z]{3,}", text.lower()) if w not in _STOPWORDS})


class LinkedNotesStore(StoreBase):
    """A-MEM-style notes: keywords, links to similar notes sharing a keyword, evolving tags (see module docstring)."""

    kind = "linked_notes"
    time_query = "until"

    def __init__(self, path, *, embedder=None, links: int = 3, **kw):
        if isinstance(links, bool) or int(links) < 0:
            raise ValueError(f"links = {links!r}; expected a non-negative number of links per note")
        self.links = int(links)
        super().__init__(path, embedder=embedder or HashEmbedder(), **kw)

    def write(self, event: Event) -> WriteResult:
        """Adds a note, links it to up to `links` similar earlier notes sharing a keyword, evolves their tags."""
        event = self._check_event(event)
        vec_D = self._embed([event.text])[0]
        words = keywords(event.text)
        with self.db.transaction():
            vis, args = self._visible_sql(float(event.time))
            near = self._ranked(vec_D, max(4 * self.links, 1), vis, args) if self.links and len(self) else []
            note = self._insert("note", event.text, event, meta={"keywords": words, "tags": words}, vec_D=vec_D)
            linked = []
            for row, sim in near:
                if len(linked) == self.links:
                    break
                old = json.loads(self.db.query("SELECT meta FROM items WHERE id = ?", (row[0],))[0][0])
                if not set(old["keywords"]) & set(words):
                    continue
                for a, b in ((note, row[0]), (row[0], note)):
                    self.db.execute("INSERT OR REPLACE INTO links VALUES (?, ?, ?)", (a, b, float(sim)))
                old["tags"] = sorted(set(old["tags"]) | set(words))
                self.db.execute("UPDATE items SET meta = ? WHERE id = ?", (json.dumps(old), row[0]))
                linked.append(row[0])
            decisions = [self._decide("LINK", None, note, event.time, detail=json.dumps(linked))]
            self._advance(event.time)
            self._enforce_capacity(event.time)
        return WriteResult((note,), tuple(decisions))

    def linked(self, item_id: int) -> list[int]:
        """Ids of the notes linked to `item_id`."""
        return [r[0] for r in self.db.query("SELECT dst FROM links WHERE src = ? ORDER BY dst", (int(item_id),))]

    def tags(self, item_id: int) -> list[str]:
        """A note's current tags (its keywords plus those of the notes linked to it later)."""
        row = self.db.query("SELECT meta FROM items WHERE id = ?", (int(item_id),))
        if not row:
            raise ValueError(f"item_id = {item_id}: no such note in {self.db.path!r}")
        return json.loads(row[0][0])["tags"]

    def retrieve(self, query: str, k: int, *, now: float | None = None, until: float | None = None) -> list[Item]:
        """The nearest notes plus their linked neighbours (notes at or before `until`, if given), best first (see
        module docstring)."""
        self._check_text(query, "query")
        k = check_k(k)
        now = self._now(now)
        vis, args = self._visible_sql(now, until)
        hits = self._ranked(self._embed([query])[0], k, vis, args)
        scores = {int(r[0]): (r, s) for r, s in hits}
        for r, s in hits:
            for dst, w in self.db.query("SELECT dst, weight FROM links WHERE src = ?", (r[0],)):
                if dst not in scores or scores[dst][1] < 0.5 * s * w:
                    row = self._filter([dst], vis, args).get(dst)
                    if row is not None:
                        scores[dst] = (row, 0.5 * s * w)
        best = sorted(scores.values(), key=lambda rs: (-rs[1], rs[0][0]))[:k]
        items = [self._item(r, s) for r, s in best]
        self._touch([i.id for i in items], now)
        return items
