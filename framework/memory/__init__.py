"""Agent memory: stores on SQLite (+ exact and approximate vector search), write/forget policies, the ledger harness.

Glossary: N items, D embedding width, K items asked for.

Every store follows `MemoryStore` (`write(event)`, `retrieve(query, k)`, `forget(policy)`) and keeps its items in
one SQLite file (WAL, transactions, a checked schema version), so it survives a restart with nothing to start:

  store = memory.FactStore("runs/mem/facts.db")
  store.write(memory.Event("set kobu to 12.", time=1))
  store.write(memory.Event("change kobu to 40.", time=3))        # UPDATE: the old fact is superseded, kept
  [item.render() for item in store.retrieve("what is kobu now?", k=4)]   # ['day 3-now: kobu = 40']

The stores: `FullContextStore`, `RecentWindowStore`, `VectorStore` (embeddings from `LMEmbedder` - a Lumen LM's
hidden states - or `HashEmbedder`; exact sqlite-vec or approximate usearch search), `FactStore` (mem0),
`CoreArchivalStore` (MemGPT), `TemporalStore` (bi-temporal, "as of" queries), `LinkedNotesStore` (A-MEM).
Policies: `TTL`, `Capacity`, `Supersede`, `Delete` (hidden, never erased: `store.audit()` shows everything).
The ledger-dialogue harness with exact answers is `framework.memory.harness`; a store given a `db.Backend` instead of
a path stores there (`framework.memory.pg.PostgresDB`: PostgreSQL + pgvector).
"""

from framework.memory.ann import ApproxIndex, recall_at_k
from framework.memory.base import (
    TTL,
    Capacity,
    Delete,
    Event,
    Item,
    MemoryStore,
    Supersede,
    WriteResult,
    check_k,
    check_time,
)
from framework.memory.db import SCHEMA_VERSION, MemoryDB, MemoryDBError, SchemaVersionError, migrate
from framework.memory.embed import HashEmbedder, LMEmbedder
from framework.memory.stores import FullContextStore, LinkedNotesStore, RecentWindowStore, VectorStore
from framework.memory.structured import CoreArchivalStore, FactStore, TemporalStore

STORES = {
    "full_context": FullContextStore,
    "recent_window": RecentWindowStore,
    "vector": VectorStore,
    "facts": FactStore,
    "core_archival": CoreArchivalStore,
    "temporal": TemporalStore,
    "linked_notes": LinkedNotesStore,
}

__all__ = [
    "SCHEMA_VERSION",
    "STORES",
    "TTL",
    "ApproxIndex",
    "Capacity",
    "CoreArchivalStore",
    "Delete",
    "Event",
    "FactStore",
    "FullContextStore",
    "HashEmbedder",
    "Item",
    "LMEmbedder",
    "LinkedNotesStore",
    "MemoryDB",
    "MemoryDBError",
    "MemoryStore",
    "RecentWindowStore",
    "SchemaVersionError",
    "Supersede",
    "TemporalStore",
    "VectorStore",
    "WriteResult",
    "check_k",
    "check_time",
    "migrate",
    "recall_at_k",
]
