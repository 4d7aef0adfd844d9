"""A PostgreSQL + pgvector backend for the memory stores: the same tables and `Backend` methods as `db.MemoryDB`.

Glossary: N items, D embedding width, K neighbours asked for.

How a backend plugs in: a store takes either a file path (SQLite, `db.MemoryDB`) or any object implementing the
`db.Backend` protocol (`transaction`, `execute`, `executemany`, `query`, `put_vector(s)`, `get_vectors`,
`vectors_after`, `set_vector_active`, `knn`, `close`, plus `path`, `store_kind`, `embed_dim`):

    backend = PostgresDB("postgresql://user@host/db", store_kind="facts", embed_dim=256, schema="agent7_facts")
    store = memory.FactStore(backend)                     # the same store code, the same semantics

The stores pass SQL in SQLite's dialect; `to_postgres(sql)` translates the few constructs they use (`?`
placeholders, `INSERT OR REPLACE/IGNORE`, `LIMIT -1 OFFSET`, the scalar `MAX(a, b)` of the clock, `AS REAL`),
so the stores hold one copy of their SQL. One store lives in one PostgreSQL schema (what one file is for SQLite):
the tables of `db._DDL_V1` with `BIGSERIAL` ids, the migrations of `db.MIGRATIONS` applied in order (the schema
version is a row of `meta`, checked on open like SQLite's `user_version`: newer is refused, older needs
`migrate=True`), and the vectors in `vec_items(id, embedding vector(D), active)` with an HNSW index
(`vector_cosine_ops`), so `knn` is `ORDER BY embedding <=> q LIMIT k`: pgvector's approximate search (set
`hnsw.ef_search` per session for recall). Transactions are psycopg transactions (all or nothing, like
`BEGIN IMMEDIATE`); several processes may write one schema. `VectorStore(index="approx")` (the usearch sidecar
file) is for SQLite files only: with this backend `knn` already is the approximate index.

Needs `psycopg` (v3) and a server with the `vector` extension; neither is a Lumen dependency, so importing this
module never needs them and opening a backend without them is a clear error.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from framework.memory.db import (
    _DDL_V1,
    MIGRATIONS,
    SCHEMA_VERSION,
    MemoryDBError,
    NestedTransactions,
    SchemaVersionError,
)

__all__ = ["PostgresDB", "to_postgres"]

_REWRITES = (
    # INSERT OR REPLACE on links (the only table the stores replace rows of): an upsert on its primary key.
    (
        re.compile(r"^INSERT OR REPLACE INTO links VALUES \(\?, \?, \?\)$"),
        "INSERT INTO links VALUES (?, ?, ?) ON CONFLICT (src, dst) DO UPDATE SET weight = EXCLUDED.weight",
    ),
    (re.compile(r"^INSERT OR IGNORE INTO (\w+) (.*)$", re.S), r"INSERT INTO \1 \2 ON CONFLICT DO NOTHING"),
    (re.compile(r"LIMIT -1 OFFSET"), "OFFSET"),
    (re.compile(r"CAST\(MAX\("), "CAST(GREATEST("),
    (re.compile(r"\bAS REAL\b"), "AS DOUBLE PRECISION"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGSERIAL PRIMARY KEY"),
)


def to_postgres(sql: str) -> str:
    """The stores' SQLite-dialect statement `sql` in PostgreSQL's dialect (placeholders become %s)."""
    if "INSERT OR " in sql and not any(p.search(sql) for p, _ in _REWRITES[:2]):
        raise ValueError(f"sql = {sql!r}: an INSERT OR ... this backend has no translation for")
    for pattern, repl in _REWRITES:
        sql = pattern.sub(repl, sql)
    if "%" in sql:
        sql = sql.replace("%", "%%")
    return sql.replace("?", "%s")


def _vector_literal(v_D: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in v_D) + "]"


def _parse_vector(text: str) -> np.ndarray:
    return np.asarray([float(x) for x in text.strip("[]").split(",") if x], np.float32)


class PostgresDB(NestedTransactions):
    """One memory store in one PostgreSQL schema (pgvector for vectors): a `db.Backend` (see module docstring)."""

    def __init__(
        self, dsn: str, *, store_kind: str, embed_dim: int | None = None, schema: str = "lumen_memory", migrate=False
    ):
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise ValueError(f"schema = {schema!r}; expected a lowercase SQL identifier")
        try:
            import psycopg
        except ImportError as err:
            raise MemoryDBError(
                "PostgresDB needs the psycopg package (v3) and a PostgreSQL server with pgvector; neither is installed "
                "with Lumen: pip install 'psycopg[binary]' and CREATE EXTENSION vector on the server"
            ) from err
        self.path, self.store_kind, self.schema = f"{dsn}#{schema}", store_kind, schema
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        with self.transaction():
            fresh = not self._conn.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = %s AND table_name = 'meta'", (schema,)
            ).fetchall()
            self._conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            self._conn.execute(f"SET search_path TO {schema}, public")
            if fresh:
                self._conn.execute(to_postgres(_DDL_V1))
                for v in range(1, SCHEMA_VERSION):
                    self._conn.execute(to_postgres(MIGRATIONS[v]))
                self._conn.execute(
                    "INSERT INTO meta VALUES ('store_kind', %s), ('embed_dim', %s), ('schema_version', %s)",
                    (store_kind, str(embed_dim or 0), str(SCHEMA_VERSION)),
                )
                if embed_dim:
                    self._conn.execute(
                        f"CREATE TABLE vec_items (id BIGINT PRIMARY KEY, embedding vector({int(embed_dim)}), "
                        "active BOOLEAN NOT NULL)"
                    )
                    self._conn.execute(
                        "CREATE INDEX vec_items_hnsw ON vec_items USING hnsw (embedding vector_cosine_ops)"
                    )
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            version = int(meta.get("schema_version", 1))
            if version > SCHEMA_VERSION or (version < SCHEMA_VERSION and not migrate):
                raise SchemaVersionError(
                    f"memory schema {self.path!r} has schema version {version}, this Lumen's is {SCHEMA_VERSION}: "
                    + ("upgrade Lumen to read it" if version > SCHEMA_VERSION else "open it with migrate=True")
                )
            for v in range(version, SCHEMA_VERSION):
                self._conn.execute(to_postgres(MIGRATIONS[v]))
                self._conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(v + 1),))
        if meta.get("store_kind") != store_kind:
            raise MemoryDBError(f"memory schema {self.path!r} belongs to a {meta.get('store_kind')!r} store")
        self.embed_dim = int(meta.get("embed_dim", 0)) or None
        if embed_dim is not None and self.embed_dim != (int(embed_dim) or None):
            raise MemoryDBError(f"memory schema {self.path!r} stores width {self.embed_dim}, opened with {embed_dim}")

    def _outer_transaction(self) -> contextlib.AbstractContextManager[None]:
        return self._conn.transaction()  # psycopg: COMMIT on exit, ROLLBACK on an exception

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Runs one statement; returns the new row's id for an INSERT into a table with ids, else 0."""
        sql = to_postgres(sql)
        if re.match(r"^INSERT INTO (items|decisions) ", sql):
            return int(self._conn.execute(sql + " RETURNING id", tuple(args)).fetchone()[0])
        self._conn.execute(sql, tuple(args))
        return 0

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Runs one statement per row."""
        with self._conn.cursor() as cur:
            cur.executemany(to_postgres(sql), [tuple(r) for r in rows])

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """All rows of one SELECT."""
        return [tuple(r) for r in self._conn.execute(to_postgres(sql), tuple(args)).fetchall()]

    def _check(self, vec_D) -> str:
        v = np.asarray(vec_D, np.float32)
        if not self.embed_dim or v.shape != (self.embed_dim,) or not np.all(np.isfinite(v)):
            raise ValueError(f"embedding of shape {v.shape}: expected a finite vector of shape ({self.embed_dim},)")
        return _vector_literal(v)

    def put_vector(self, item_id: int, vec_D: np.ndarray, active: bool = True) -> None:
        """Stores (or replaces) the embedding of item `item_id`."""
        self._conn.execute(
            "INSERT INTO vec_items VALUES (%s, %s::vector, %s) ON CONFLICT (id) DO UPDATE SET "
            "embedding = EXCLUDED.embedding, active = EXCLUDED.active",
            (int(item_id), self._check(vec_D), bool(active)),
        )

    def put_vectors(self, item_ids: Sequence[int], x_ND: np.ndarray) -> None:
        """Stores the embeddings of new items, all searchable."""
        with self._conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO vec_items VALUES (%s, %s::vector, TRUE)",
                [(int(i), self._check(row)) for i, row in zip(item_ids, np.asarray(x_ND))],
            )

    def get_vectors(self, item_ids: Sequence[int]) -> np.ndarray:
        """[N, D] embeddings of the given items, in order."""
        rows = dict(
            self._conn.execute(
                "SELECT id, embedding::text FROM vec_items WHERE id = ANY(%s)", ([int(i) for i in item_ids],)
            ).fetchall()
        )
        missing = [i for i in item_ids if int(i) not in rows]
        if missing:
            raise ValueError(f"items {missing} have no embedding in {self.path!r}")
        return np.stack([_parse_vector(rows[int(i)]) for i in item_ids]) if rows else np.zeros((0, self.embed_dim))

    def vectors_after(self, item_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N], embeddings [N, D]) of every item with an id above `item_id`."""
        rows = self._conn.execute(
            "SELECT id, embedding::text FROM vec_items WHERE id > %s ORDER BY id", (int(item_id),)
        ).fetchall()
        ids_N = np.array([r[0] for r in rows], np.int64)
        x_ND = np.stack([_parse_vector(r[1]) for r in rows]) if rows else np.zeros((0, self.embed_dim or 0))
        return ids_N, x_ND.astype(np.float32)

    def set_vector_active(self, item_ids: Sequence[int], active: bool) -> None:
        """Marks embeddings searchable or not (hidden items keep theirs, for audit)."""
        if self.embed_dim:
            self._conn.execute(
                "UPDATE vec_items SET active = %s WHERE id = ANY(%s)", (bool(active), [int(i) for i in item_ids])
            )

    def knn(self, vec_D: np.ndarray, k: int, *, active_only: bool = True) -> list[tuple[int, float]]:
        """About the K nearest items by cosine distance (pgvector HNSW), nearest first: [(item_id, distance)]."""
        if isinstance(k, bool) or int(k) <= 0:
            raise ValueError(f"k = {k}; expected a positive number of neighbours")
        where = "WHERE active" if active_only else ""
        rows = self._conn.execute(
            f"SELECT id, embedding <=> %s::vector AS d FROM vec_items {where} ORDER BY d LIMIT %s",
            (self._check(vec_D), int(k)),
        ).fetchall()
        return [(int(i), float(d)) for i, d in rows]

    def close(self) -> None:
        """Closes the connection (committed rows are on the server)."""
        self._conn.close()
