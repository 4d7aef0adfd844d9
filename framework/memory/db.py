"""The storage layer under every memory store: one SQLite file per store (WAL, transactions, a schema version).

Glossary: N items, D embedding width, K neighbours asked for.

`MemoryDB(path, store_kind=..., embed_dim=...)` opens (or creates) one store's file through `apsw` (which bundles
SQLite and can load extensions) with the `sqlite-vec` extension loaded, so exact nearest-neighbour search is a SQL
query over a `vec0` virtual table. The file survives a restart with nothing to start: reopening it gives the same
rows and the same retrievals.

Durability and concurrency:
- WAL journal: readers never block the writer, and a process killed at any moment (SIGKILL included) leaves the
  file readable with every committed transaction in it. `synchronous="NORMAL"` (default) is durable against a
  process crash; `"FULL"` also against power loss (one fsync per commit).
- `with db.transaction():` is `BEGIN IMMEDIATE ... COMMIT` (ROLLBACK on any exception), so a write either lands
  whole or not at all. Several processes may write one file: SQLite serialises them on its write lock and a writer
  waits up to `busy_timeout_ms` for it.

Schema versions: the file records its version (`PRAGMA user_version`) and its store kind. A fresh file is created
by running the DDL of version 1 and then every forward migration, so the migrations are the one path to the
current layout. Opening a file of an older version is an error until it is migrated explicitly
(`migrate(path)` or `MemoryDB(..., migrate=True)`, which first writes a backup `path + ".v<old>.bak"`); a file
from a newer version, a file of another store kind, or a file that is not a readable SQLite database is refused
with a `MemoryDBError` naming the path.

Past one machine, the storage layer is the `Backend` protocol below (what the stores call). A PostgreSQL +
pgvector backend implements the same methods: the same tables (INTEGER PRIMARY KEY -> BIGSERIAL, meta as JSONB),
`knn` as `SELECT id, embedding <=> $1 FROM items WHERE active ORDER BY 2 LIMIT $2` over a `vector(D)` column with
an HNSW index, `transaction()` as a psycopg transaction, and `?` placeholders translated to `%s`. Stores never
import apsw, but a few of the statements they pass to `execute`/`query` are SQLite's dialect (`INSERT OR REPLACE`,
`LIMIT -1 OFFSET`, `ON CONFLICT ... DO UPDATE` with `MAX`) and need translating for another engine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import apsw
import numpy as np
import sqlite_vec

__all__ = [
    "SCHEMA_VERSION",
    "Backend",
    "MemoryDB",
    "NestedTransactions",
    "MemoryDBError",
    "SchemaVersionError",
    "migrate",
]

SCHEMA_VERSION = 2
SYNCHRONOUS = ("OFF", "NORMAL", "FULL")

# The layout of version 1: items, links between items, named core blocks, the audit log of write decisions.
_DDL_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
  id INTEGER PRIMARY KEY,
  kind TEXT NOT NULL,
  key TEXT,
  text TEXT NOT NULL,
  time REAL NOT NULL,
  session INTEGER,
  recorded_at REAL NOT NULL,
  valid_from REAL,
  valid_to REAL,
  invalidated_at REAL,
  status TEXT NOT NULL DEFAULT 'active',
  hidden_reason TEXT,
  hidden_at REAL,
  superseded_by INTEGER,
  meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX items_status_time ON items(status, time);
CREATE INDEX items_key ON items(key, status);
CREATE TABLE links (src INTEGER NOT NULL, dst INTEGER NOT NULL, weight REAL NOT NULL, PRIMARY KEY (src, dst));
CREATE TABLE blocks (name TEXT PRIMARY KEY, text TEXT NOT NULL, char_limit INTEGER NOT NULL);
CREATE TABLE decisions (id INTEGER PRIMARY KEY, time REAL NOT NULL, op TEXT NOT NULL, key TEXT, item_id INTEGER,
                        detail TEXT NOT NULL DEFAULT '');
"""

# MIGRATIONS[v] takes a file from version v to v + 1. Version 2 adds what the write/forget policies need:
# per-item use counts (least-used eviction) and an expiry time (TTL).
MIGRATIONS: dict[int, str] = {
    1: """
ALTER TABLE items ADD COLUMN uses INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN last_used REAL;
ALTER TABLE items ADD COLUMN expires_at REAL;
CREATE INDEX items_uses ON items(status, uses, last_used);
""",
}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION)), MIGRATIONS


class MemoryDBError(ValueError):
    """A memory database that cannot be used as asked: damaged, of another store kind, or otherwise unreadable."""


class SchemaVersionError(MemoryDBError):
    """A memory database whose schema version is not this code's: newer (refused) or older (migrate it first)."""


class Backend(Protocol):
    """What the memory stores need from storage; `MemoryDB` is the SQLite implementation."""

    path: str
    store_kind: str
    embed_dim: int | None

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """All statements inside commit together or not at all."""
        ...

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Runs one statement; returns the last inserted row id."""
        ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Runs one statement per row."""
        ...

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Rows of one SELECT."""
        ...

    def put_vector(self, item_id: int, vec_D: np.ndarray, active: bool = True) -> None:
        """Stores (or replaces) the embedding of item `item_id`."""
        ...

    def put_vectors(self, item_ids: Sequence[int], x_ND: np.ndarray) -> None:
        """Stores the embeddings of new items, all searchable."""
        ...

    def get_vectors(self, item_ids: Sequence[int]) -> np.ndarray:
        """[N, D] embeddings of the given items."""
        ...

    def vectors_after(self, item_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N], embeddings [N, D]) of every item with an id above `item_id` (what an ANN index lacks)."""
        ...

    def set_vector_active(self, item_ids: Sequence[int], active: bool) -> None:
        """Marks embeddings as searchable or not (hidden items keep theirs, for audit)."""
        ...

    def knn(self, vec_D: np.ndarray, k: int, *, active_only: bool = True) -> list[tuple[int, float]]:
        """Exact K nearest items by cosine distance: [(item_id, distance)], nearest first."""
        ...

    def close(self) -> None: ...


def _connect(path: str, busy_timeout_ms: int) -> apsw.Connection:
    conn = apsw.Connection(path)
    conn.set_busy_timeout(int(busy_timeout_ms))
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    conn.enable_load_extension(False)
    return conn


@contextlib.contextmanager
def _immediate(conn: apsw.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _vec_ddl(dim: int) -> str:
    return (
        f"CREATE VIRTUAL TABLE vec_items USING vec0(embedding float[{int(dim)}] distance_metric=cosine, active integer)"
    )


def _create(conn: apsw.Connection, store_kind: str, embed_dim: int | None, version: int) -> None:
    """Writes a fresh store at schema `version` (the DDL of version 1, then the migrations up to `version`)."""
    with conn:  # a savepoint inside the caller's transaction, else a transaction of its own
        conn.execute(_DDL_V1)
        for v in range(1, version):
            conn.execute(MIGRATIONS[v])
        conn.execute("INSERT INTO meta VALUES ('store_kind', ?), ('embed_dim', ?)", (store_kind, str(embed_dim or 0)))
        if embed_dim:
            conn.execute(_vec_ddl(embed_dim))
        conn.execute(f"PRAGMA user_version = {int(version)}")


def _damaged(path: str, err: Exception) -> MemoryDBError:
    return MemoryDBError(
        f"memory database {path!r} is not a readable SQLite memory store ({type(err).__name__}: {err}); the file is "
        "damaged or not a store: restore it from a backup or remove it to start empty"
    )


def migrate(path: str, *, busy_timeout_ms: int = 30_000) -> int:
    """Upgrades the memory database at `path` to this code's schema version in one transaction; returns the old one.

    A backup of the file as it was is written first to `path + ".v<old>.bak"`. A file already at the current version
    is left alone; a newer one raises SchemaVersionError.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MemoryDBError(f"migrate: no memory database at {path!r}")
    try:
        conn = _connect(path, busy_timeout_ms)
        old = int(conn.execute("PRAGMA user_version").fetchall()[0][0])
    except (apsw.NotADBError, apsw.CorruptError) as err:
        raise _damaged(path, err) from err
    try:
        if old > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"memory database {path!r} has schema version {old}, newer than this Lumen's {SCHEMA_VERSION}: "
                "upgrade Lumen to read it (older code never rewrites a newer file)"
            )
        if old == SCHEMA_VERSION:
            return old
        if old < 1:
            raise MemoryDBError(f"memory database {path!r} has schema version {old}: not a Lumen memory store")
        backup = f"{path}.v{old}.bak"
        with apsw.Connection(backup) as dst, dst.backup("main", conn, "main") as b:
            b.step()
        with _immediate(conn):
            for v in range(old, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[v])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return old
    finally:
        conn.close()


class NestedTransactions:
    """The `transaction()` every backend shares: the outermost use opens the backend's own transaction
    (`_outer_transaction`), nested uses join it, so a store method that writes in a transaction can call another."""

    _depth = 0

    def _outer_transaction(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All statements inside commit together or not at all; nested uses join the outer transaction."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with self._outer_transaction():
                yield
        finally:
            self._depth = 0


class MemoryDB(NestedTransactions):
    """One memory store's SQLite file: WAL, transactions, schema check, exact vector search (see module docstring).

    `store_kind` names the store that owns the file (opening it as another kind is an error); `embed_dim` > 0 adds
    the vector table (fixed at creation). `migrate=True` upgrades an older file (with a backup) instead of refusing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        store_kind: str,
        embed_dim: int | None = None,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 30_000,
        migrate: bool = False,
    ):
        self.path = os.fspath(path)
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous = {synchronous!r}; expected one of {SYNCHRONOUS}")
        if embed_dim is not None and int(embed_dim) < 0:
            raise ValueError(f"embed_dim = {embed_dim}; expected None or a positive width")
        if self.path != ":memory:" and os.path.isdir(self.path):
            raise MemoryDBError(f"memory database path {self.path!r} is a directory; expected a file path")
        self.store_kind = store_kind
        fresh = self.path == ":memory:" or not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        try:
            self._conn = _connect(self.path, busy_timeout_ms)
        except apsw.CantOpenError as err:
            raise MemoryDBError(
                f"cannot open memory database {self.path!r} ({err}): does its folder exist, and is it writable?"
            ) from err
        try:
            self._open(fresh, embed_dim, migrate, busy_timeout_ms)
            self._conn.execute(f"PRAGMA synchronous = {synchronous}")
        except (apsw.NotADBError, apsw.CorruptError) as err:
            self._conn.close()
            raise _damaged(self.path, err) from err
        except Exception:
            self._conn.close()
            raise

    def _open(self, fresh: bool, embed_dim: int | None, do_migrate: bool, busy_timeout_ms: int) -> None:
        conn = self._conn
        if self.path != ":memory:":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            if mode.lower() != "wal":
                raise MemoryDBError(f"memory database {self.path!r}: could not switch to WAL (journal_mode={mode})")
        if fresh:
            with _immediate(conn):  # two processes creating one file at once: only the first writes the schema
                if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchall():
                    _create(conn, self.store_kind, embed_dim, SCHEMA_VERSION)
        with contextlib.suppress(apsw.Error):
            conn.execute("PRAGMA optimize=0x10002")  # statistics for a file written before (see `close`)
        version = int(conn.execute("PRAGMA user_version").fetchall()[0][0])
        if version != SCHEMA_VERSION:
            if version > SCHEMA_VERSION or not do_migrate:
                if version > SCHEMA_VERSION:
                    msg = f"newer than this Lumen's {SCHEMA_VERSION}: upgrade Lumen to read it"
                else:
                    msg = (
                        f"older than this Lumen's {SCHEMA_VERSION}: upgrade it with "
                        "framework.memory.migrate(path) or open it with migrate=True (a backup is kept)"
                    )
                raise SchemaVersionError(f"memory database {self.path!r} has schema version {version}, {msg}")
            conn.close()
            migrate(self.path, busy_timeout_ms=busy_timeout_ms)
            self._conn = conn = _connect(self.path, busy_timeout_ms)
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchall():
            raise MemoryDBError(f"{self.path!r} is a SQLite file but not a Lumen memory store (no meta table)")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("store_kind") != self.store_kind:
            raise MemoryDBError(
                f"memory database {self.path!r} belongs to a {meta.get('store_kind')!r} store, opened as "
                f"{self.store_kind!r}: open it with the store class that wrote it"
            )
        stored_dim = int(meta.get("embed_dim", 0)) or None
        if embed_dim is not None and stored_dim != (int(embed_dim) or None):
            raise MemoryDBError(
                f"memory database {self.path!r} stores embeddings of width {stored_dim}, opened with embed_dim = "
                f"{embed_dim}: use the embedder the store was written with"
            )
        self.embed_dim = stored_dim

    # ---- transactions and statements ----
    @contextlib.contextmanager
    def _outer_transaction(self) -> Iterator[None]:
        """`BEGIN IMMEDIATE` ... `COMMIT`, or ROLLBACK on any exception."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Runs one statement (inside the current transaction, if any); returns the last inserted row id."""
        try:
            self._conn.execute(sql, tuple(args))
        except apsw.CorruptError as err:
            raise _damaged(self.path, err) from err
        return int(self._conn.last_insert_rowid())

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Runs one statement per row of `rows`."""
        try:
            self._conn.executemany(sql, [tuple(r) for r in rows])
        except apsw.CorruptError as err:
            raise _damaged(self.path, err) from err

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """All rows of one SELECT."""
        try:
            return [tuple(r) for r in self._conn.execute(sql, tuple(args)).fetchall()]
        except apsw.CorruptError as err:
            raise _damaged(self.path, err) from err

    # ---- vectors (sqlite-vec, exact) ----
    def _check_vec(self, vec_D: np.ndarray) -> bytes:
        if not self.embed_dim:
            raise MemoryDBError(f"memory database {self.path!r} has no vector table (created without embed_dim)")
        v = np.asarray(vec_D, np.float32)
        if v.shape != (self.embed_dim,) or not np.all(np.isfinite(v)):
            raise ValueError(f"embedding of shape {v.shape}: expected a finite vector of shape ({self.embed_dim},)")
        return v.tobytes()

    def put_vector(self, item_id: int, vec_D: np.ndarray, active: bool = True) -> None:
        """Stores (or replaces) the embedding of item `item_id`."""
        blob = self._check_vec(vec_D)
        self.execute("DELETE FROM vec_items WHERE rowid = ?", (int(item_id),))
        self.execute(
            "INSERT INTO vec_items(rowid, embedding, active) VALUES (?, ?, ?)", (int(item_id), blob, int(active))
        )

    def put_vectors(self, item_ids: Sequence[int], x_ND: np.ndarray) -> None:
        """Stores the embeddings of new items (one row of `x_ND` per id), all searchable."""
        x = np.ascontiguousarray(x_ND, np.float32)
        if x.ndim != 2 or x.shape != (len(item_ids), self.embed_dim) or not np.all(np.isfinite(x)):
            raise ValueError(f"embeddings of shape {x.shape}: expected finite [{len(item_ids)}, {self.embed_dim}]")
        self.executemany(
            "INSERT INTO vec_items(rowid, embedding, active) VALUES (?, ?, 1)",
            [(int(i), row.tobytes()) for i, row in zip(item_ids, x)],
        )

    def set_vector_active(self, item_ids: Sequence[int], active: bool) -> None:
        """Marks embeddings searchable (active) or not; hidden items keep theirs for audit."""
        if self.embed_dim:
            self.executemany(
                "UPDATE vec_items SET active = ? WHERE rowid = ?", [(int(active), int(i)) for i in item_ids]
            )

    def get_vectors(self, item_ids: Sequence[int]) -> np.ndarray:
        """[N, D] float32 embeddings of the given items, in order (ValueError for an item without one)."""
        out = np.zeros((len(item_ids), self.embed_dim or 0), np.float32)
        for n, i in enumerate(item_ids):
            row = self.query("SELECT embedding FROM vec_items WHERE rowid = ?", (int(i),))
            if not row:
                raise ValueError(f"item {i} has no embedding in {self.path!r}")
            out[n] = np.frombuffer(row[0][0], np.float32)
        return out

    def vectors_after(self, item_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N], embeddings [N, D]) of every item with an id above `item_id` (what an ANN index lacks)."""
        newest = self.query("SELECT MAX(id) FROM items")[0][0] if self.embed_dim else None  # O(1), unlike vec0
        if newest is None or newest <= item_id:
            return np.zeros(0, np.int64), np.zeros((0, self.embed_dim or 0), np.float32)
        # A rowid range over vec0 scans the whole table: worth it for many rows, point lookups for a few.
        if newest - item_id > 1000:
            rows = self.query("SELECT rowid, embedding FROM vec_items WHERE rowid > ? ORDER BY rowid", (int(item_id),))
        else:
            ids = [r[0] for r in self.query("SELECT id FROM items WHERE id > ? ORDER BY id", (int(item_id),))]
            rows = [(i, r[0]) for i in ids for r in self.query("SELECT embedding FROM vec_items WHERE rowid = ?", (i,))]
        ids_N = np.array([r[0] for r in rows], np.int64)
        x_ND = np.stack([np.frombuffer(r[1], np.float32) for r in rows]) if rows else np.zeros((0, self.embed_dim))
        return ids_N, x_ND.astype(np.float32)

    def knn(self, vec_D: np.ndarray, k: int, *, active_only: bool = True) -> list[tuple[int, float]]:
        """Exact K nearest items by cosine distance, nearest first: [(item_id, distance)]."""
        if int(k) <= 0:
            raise ValueError(f"k = {k}; expected a positive number of neighbours")
        blob = self._check_vec(vec_D)
        where = " AND active = 1" if active_only else ""
        rows = self.query(
            f"SELECT rowid, distance FROM vec_items WHERE embedding MATCH ? AND k = ?{where} ORDER BY distance",
            (blob, int(k)),
        )
        return [(int(i), float(d)) for i, d in rows]

    # ---- maintenance ----
    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check`: "ok", or the problems it found."""
        return "\n".join(str(r[0]) for r in self.query("PRAGMA integrity_check"))

    def checkpoint(self) -> None:
        """Folds the WAL into the main file (a clean copy for backups)."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Closes the connection (committed data is already on disk), leaving the query planner's statistics fresh."""
        # Without statistics SQLite runs the visibility filter of a retrieval by scanning every active item instead
        # of k primary-key lookups (~80 ms at 1e6 items): `optimize` gathers what the planner needs, cheaply.
        with contextlib.suppress(apsw.Error):
            self._conn.execute("PRAGMA optimize")
        self._conn.close()

    def __enter__(self) -> MemoryDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_at_version(path: str, store_kind: str, version: int, embed_dim: int | None = None) -> None:
    """Writes a fresh, empty store at an older schema `version` (for migration tests and tools)."""
    if not 1 <= int(version) <= SCHEMA_VERSION:
        raise ValueError(f"version = {version}; expected 1..{SCHEMA_VERSION}")
    conn = _connect(os.fspath(path), 30_000)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        _create(conn, store_kind, embed_dim, int(version))
    finally:
        conn.close()


def copy_file(src: str, dst: str) -> None:
    """Copies a (closed) store file with its WAL, for backups and tests."""
    for suffix in ("", "-wal"):
        if os.path.exists(src + suffix):
            shutil.copyfile(src + suffix, dst + suffix)
