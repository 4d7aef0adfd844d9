"""The PostgreSQL + pgvector backend against a real server: a throwaway one per module, or $LUMEN_PG_DSN's.

The server is started by `pg.local_server` (initdb + pg_ctl in a temporary folder, 127.0.0.1, a free port) and
stopped by the fixture; without the PostgreSQL binaries, the `postgres` user (as root), psycopg or pgvector the
server tests skip and say which is missing. The SQL-translation test runs on SQLite and needs none of them.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from test_memory_db import SCRIPT_EVENTS, SCRIPT_QUERIES

from framework import memory
from framework.memory import db as db_lib
from framework.memory import pg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dsn():
    """A PostgreSQL server with pgvector for this module: $LUMEN_PG_DSN, else a throwaway local one."""
    if os.environ.get("LUMEN_PG_DSN"):
        pytest.importorskip("psycopg", reason="LUMEN_PG_DSN is set but psycopg (v3) is not installed")
        yield os.environ["LUMEN_PG_DSN"]
        return
    server = pg.local_server(settings={"fsync": "off"})  # durability against power loss is not what is tested
    try:
        url = server.__enter__()
    except pg.PostgresUnavailable as err:
        pytest.skip(f"no PostgreSQL server for these tests: {err}")
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


@pytest.fixture
def schema(dsn):
    """A fresh schema name (one store), dropped after the test (so a shared $LUMEN_PG_DSN server stays clean)."""
    import psycopg

    name = f"lumen_test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def _open(dsn, schema, kind, **kw):
    dim = None if kind in ("full_context", "recent_window") else 256  # the stores' default embedders' width
    return pg.PostgresDB(dsn, store_kind=kind, embed_dim=dim, schema=schema, **kw)


def _retrievals(store):
    """Each script query's top 3, and again narrowed to day 2 where the store has a time filter."""
    narrow = {} if store.time_query is None else {store.time_query: 2}
    return [
        [(i.id, i.text, round(i.score, 5)) for i in store.retrieve(q, 3, **kw)]
        for q in SCRIPT_QUERIES
        for kw in ({}, narrow)
    ]


@pytest.mark.parametrize("kind", sorted(memory.STORES))
def test_every_store_on_postgres_retrieves_what_sqlite_does_and_after_reopen(dsn, schema, tmp_path, kind):
    cls = memory.STORES[kind]
    lite, post = cls(tmp_path / "m.db"), cls(_open(dsn, schema, kind))
    for t, text in enumerate(SCRIPT_EVENTS):
        a, b = (s.write(memory.Event(text, time=float(t), session=t // 3)) for s in (lite, post))
        assert a == b  # the same ids and the same ADD/UPDATE/DELETE/NOOP decisions
    assert post.forget(memory.Capacity(4)) == lite.forget(memory.Capacity(4))
    expected = _retrievals(lite)
    assert _retrievals(post) == expected and any(expected)
    audit = lite.audit()
    post.close()
    with cls(_open(dsn, schema, kind)) as again:  # a new connection: everything was committed on the server
        assert again.audit() == audit
        assert _retrievals(again) == _retrievals(lite)
    lite.close()


def test_fact_store_round_trip(dsn, schema):
    with memory.FactStore(_open(dsn, schema, "facts")) as store:
        store.write(memory.Event("set kobu to 12.", time=1))
        assert store.write(memory.Event("change kobu to 40.", time=5)).decisions[0][0] == "UPDATE"
    with memory.FactStore(_open(dsn, schema, "facts")) as store:
        assert [i.render() for i in store.retrieve("what is kobu now?", 4)] == ["day 5-now: kobu = 40"]
        assert [a["status"] for a in store.audit()] == ["hidden", "active"]


def test_schema_version_newer_refused_older_migrated_only_when_asked(dsn, schema):
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:  # a store written at version 1 (no uses / expiry columns)
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"SET search_path TO {schema}")
        conn.execute(pg.to_postgres(db_lib._DDL_V1))
        conn.execute(
            "INSERT INTO meta VALUES ('store_kind', 'full_context'), ('embed_dim', '0'), ('schema_version', '1')"
        )
    with pytest.raises(memory.SchemaVersionError, match=r"schema version 1, older.*migrate=True"):
        _open(dsn, schema, "full_context")
    with memory.FullContextStore(_open(dsn, schema, "full_context", migrate=True), capacity=1) as store:
        store.write(memory.Event("set a to 1.", time=0))  # the v2 columns (uses, expiry) now exist
        store.write(memory.Event("set b to 2.", time=1))
        assert [i.text for i in store.retrieve("a", 5)] == ["set b to 2."]
        assert store.db.query("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(memory.SCHEMA_VERSION),)]
        with pytest.raises(memory.MemoryDBError, match="belongs to a 'full_context' store"):
            _open(dsn, schema, "vector")
        store.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(memory.SCHEMA_VERSION + 1),))
    with pytest.raises(memory.SchemaVersionError, match="newer than this Lumen"):
        _open(dsn, schema, "full_context")
    with pytest.raises(memory.MemoryDBError, match="cannot connect to PostgreSQL"):
        pg.PostgresDB("host=127.0.0.1 port=1 user=nobody connect_timeout=2", store_kind="facts")


def test_a_failed_transaction_writes_nothing(dsn, schema):
    import psycopg

    with memory.VectorStore(_open(dsn, schema, "vector")) as store:
        store.write(memory.Event("set kobu to 1.", time=0))
        with pytest.raises(RuntimeError):
            with store.db.transaction():
                store.db.execute("INSERT INTO items (kind, text, time, recorded_at) VALUES ('event', 'half', 1, 1)")
                raise RuntimeError("crash between the item and its embedding")
        with pytest.raises(psycopg.errors.UndefinedColumn):  # a statement the server rejects, midway
            with store.db.transaction():
                store.db.execute("INSERT INTO items (kind, text, time, recorded_at) VALUES ('event', 'half', 1, 1)")
                store.db.execute("UPDATE items SET no_such_column = 1")
        with pytest.raises(ValueError, match="embeddings of shape"):  # a bad embedding aborts the whole batch
            store.write_many(
                [memory.Event("set a to 1.", time=1), memory.Event("set b to 2.", time=1)],
                vectors_ND=[[0.0] * store.embedder.dim],
            )
        assert [a["text"] for a in store.audit()] == ["set kobu to 1."]
        assert store.db.query("SELECT COUNT(*) FROM vec_items") == [(1,)]
        assert store.write(memory.Event("set zed to 2.", time=2)).item_ids  # the connection is usable after


def test_pgvector_hnsw_knn_against_exact_cosine(dsn, schema):
    rng = np.random.default_rng(0)
    n, dim = 3000, 32
    centres_CD = rng.standard_normal((n // 100, dim))
    x_ND = (centres_CD[rng.integers(len(centres_CD), size=n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    x_ND /= np.linalg.norm(x_ND, axis=1, keepdims=True)
    q_QD = x_ND[rng.integers(n, size=50)] + 0.1 * rng.standard_normal((50, dim)).astype(np.float32)
    q_QD /= np.linalg.norm(q_QD, axis=1, keepdims=True)
    exact_QK = np.argsort(-(q_QD @ x_ND.T), axis=1)[:, :10] + 1  # ids start at 1
    db = pg.PostgresDB(dsn, store_kind="vector", embed_dim=dim, schema=schema, ef_search=100)
    try:
        db.drop_index()  # a bulk load, then one index build (row-by-row HNSW inserts cost ~1 ms each)
        assert [i for i, _ in db.knn(q_QD[0], 10)] == []
        with db.transaction():
            db.put_vectors(np.arange(1, n + 1), x_ND)
        assert [i for i, _ in db.knn(q_QD[0], 10)] == list(exact_QK[0])  # no index: an exact scan
        db.rebuild_index()
        db.execute("SET enable_seqscan = off")  # at 3000 rows the planner rightly prefers an exact scan: force HNSW
        plan = "\n".join(
            r[0]
            for r in db.query(
                "EXPLAIN SELECT id FROM vec_items ORDER BY embedding <=> ? LIMIT 10", (pg._vector_literal(q_QD[0]),)
            )
        )
        assert "vec_items_hnsw" in plan  # knn is the approximate index, not a scan
        got = [db.knn(q, 10) for q in q_QD]
        got_QK = np.array([[i for i, _ in hits] for hits in got])
        recall = memory.recall_at_k(exact_QK, got_QK)
        assert recall >= 0.95, recall
        for q, hits in zip(q_QD, got):  # distances are cosine distances, nearest first
            ids = [i for i, _ in hits]
            np.testing.assert_allclose([d for _, d in hits], 1 - x_ND[np.array(ids) - 1] @ q, atol=1e-5)
            assert [d for _, d in hits] == sorted(d for _, d in hits)
        # Hidden vectors drop out, and the scan still fills k: with ef_search 10 and the 30 nearest hidden, the
        # first 10 candidates all fail the filter, so the index scan has to go on (pgvector's iterative scan).
        order_N = np.argsort(-(x_ND @ q_QD[0])) + 1
        hidden = [int(i) for i in order_N[:30]]
        db.set_vector_active(hidden, False)
        narrow = pg.PostgresDB(dsn, store_kind="vector", embed_dim=dim, schema=schema, ef_search=10)
        narrow.execute("SET enable_seqscan = off")
        after = [i for i, _ in narrow.knn(q_QD[0], 10)]
        narrow.close()
        assert len(after) == 10 and not set(after) & set(hidden)
        assert memory.recall_at_k(order_N[None, 30:40], np.array([after])) >= 0.8
        assert [i for i, _ in db.knn(q_QD[0], 10, active_only=False)] == list(got_QK[0])
        with pytest.raises(ValueError, match="k = 0"):
            db.knn(q_QD[0], 0)
        with pytest.raises(ValueError, match="ef_search"):
            pg.PostgresDB(dsn, store_kind="vector", embed_dim=dim, schema=schema, ef_search=0)
    finally:
        db.close()


# A writer process: writes `n` facts (five keys, values that collide across writers) to one PostgreSQL store.
WRITER = textwrap.dedent("""
    import sys
    from framework import memory
    from framework.memory import pg
    dsn, schema, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    KEYS = ("kobu", "lima", "pato", "zeta", "mira")
    store = memory.FactStore(pg.PostgresDB(dsn, store_kind="facts", embed_dim=256, schema=schema))
    for i in range(n):
        r = store.write(memory.Event(f"set {KEYS[i % 5]} to {(i * 7 + len(tag)) % 3}.", time=float(i)))
        print(" ".join(str(i) for i in r.item_ids), flush=True)
    store.close()
""")


@pytest.mark.slow  # two interpreters importing the stores (~1.5 CPU-s); SQLite's two-writer test stays fast
def test_two_writer_processes_leave_consistent_rows(dsn, schema):
    memory.FactStore(_open(dsn, schema, "facts")).close()  # created once (a racing creation is also locked)
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, dsn, schema, tag, "100"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in ("p", "qq")
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ids = [int(i) for out in outs for i in out.split()]
    assert len(ids) == len(set(ids)) > 0
    with memory.FactStore(_open(dsn, schema, "facts")) as store:
        audit = store.audit()
        assert sorted(a["id"] for a in audit) == sorted(ids)
        active = [a["key"] for a in audit if a["status"] == "active"]
        assert sorted(active) == [
            "kobu",
            "lima",
            "mira",
            "pato",
            "zeta",
        ]  # one current fact per key: no write interleaved
        ops = store.decisions()
        assert [op for op, _, _ in ops].count("ADD") == 5 and len(ops) == 200
        assert sum(op == "UPDATE" for op, _, _ in ops) == len(ids) - 5  # each UPDATE hid exactly one older row
        # Every fact has its embedding and the hidden ones are out of the search: same transactions.
        assert store.db.query("SELECT COUNT(*), SUM(CASE WHEN active THEN 1 ELSE 0 END) FROM vec_items") == [
            (len(ids), 5)
        ]
        values = {a["key"]: a["text"] for a in audit if a["status"] == "active"}
        for key, text in values.items():  # the last write of each key (in decision order) is the current fact
            last = [i for op, k, i in ops if k == key and op in ("ADD", "UPDATE")][-1]
            assert next(a for a in audit if a["id"] == last)["text"] == text


def test_local_server_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(pg, "_candidate_bins", lambda: ["/nonexistent/bin"])
    with pytest.raises(pg.PostgresUnavailable, match="no PostgreSQL server binaries"):
        with pg.local_server():
            pass

    def no_psycopg():
        raise memory.MemoryDBError("no psycopg")

    monkeypatch.setattr(pg, "_psycopg", no_psycopg)
    with pytest.raises(pg.PostgresUnavailable, match=r"psycopg \(v3\) is not installed"):
        with pg.local_server():
            pass
    with pytest.raises(memory.MemoryDBError, match="no psycopg"):
        pg.PostgresDB("host=127.0.0.1", store_kind="facts")
    monkeypatch.undo()
    if importlib.util.find_spec("psycopg"):
        with pytest.raises(ValueError, match="expected a libpq connection string"):
            pg.PostgresDB("host=127.0.0.1 user", store_kind="facts")
        with pytest.raises(memory.MemoryDBError, match="cannot connect") as err:
            pg.PostgresDB("postgresql://nobody:s3cret@127.0.0.1:1/x?connect_timeout=2", store_kind="facts")
        assert "s3cret" not in str(err.value)  # the password never reaches a message


class _Recording:
    """A `db.Backend` that runs on a `MemoryDB` and records every SQL statement the stores pass it."""

    def __init__(self, inner):
        self.inner, self.sql = inner, []
        self.path, self.store_kind, self.embed_dim = inner.path, inner.store_kind, inner.embed_dim

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, sql, args=()):
        self.sql.append(sql)
        return self.inner.execute(sql, args)

    def executemany(self, sql, rows):
        self.sql.append(sql)
        return self.inner.executemany(sql, rows)

    def query(self, sql, args=()):
        self.sql.append(sql)
        return self.inner.query(sql, args)


def test_a_backend_plugs_in_and_its_sql_translates_to_postgres(tmp_path):
    sql = set()
    for kind in ("facts", "linked_notes", "core_archival"):
        cls = memory.STORES[kind]
        backend = _Recording(memory.MemoryDB(tmp_path / f"{kind}.db", store_kind=kind, embed_dim=256))
        store = cls(backend, capacity=3) if kind != "core_archival" else cls(backend)
        for t, text in enumerate(
            ["set kobu to 1.", "set lima to 2.", "change kobu to 5.", "drop lima.", "set zo to 3."]
        ):
            store.write(memory.Event(text, time=t))
        assert [i.text for i in store.retrieve("what is kobu now?", 2)]
        store.forget(memory.Capacity(1))
        assert store.db is backend and backend.integrity_check() == "ok"
        store.close()
        sql |= set(backend.sql)
    assert any("INSERT OR REPLACE" in s for s in sql) and any("LIMIT -1" in s for s in sql)
    for s in sql:  # every statement the stores issue has a PostgreSQL form with no SQLite-only construct left
        out = pg.to_postgres(s)
        assert "?" not in out and "INSERT OR" not in out and "LIMIT -1" not in out and "MAX(CAST" not in out, out
    assert pg.to_postgres("SELECT a FROM t WHERE b = ? LIMIT -1 OFFSET ?") == "SELECT a FROM t WHERE b = %s OFFSET %s"
    clock = [s for s in sql if s.startswith("INSERT INTO meta VALUES ('clock'")]
    assert clock and "GREATEST(CAST(meta.value AS DOUBLE PRECISION)" in pg.to_postgres(clock[0])  # not ambiguous
    with pytest.raises(ValueError, match="no translation"):
        pg.to_postgres("INSERT OR ROLLBACK INTO x VALUES (1)")
    with pytest.raises(memory.MemoryDBError, match="holds a 'facts' store"):
        memory.TemporalStore(memory.MemoryDB(tmp_path / "facts.db", store_kind="facts"))
    with pytest.raises(ValueError, match="expected a file path or a framework.memory.db.Backend"):
        memory.FactStore(42)
