"""The memory storage layer: real files, real processes (SIGKILL mid-stream, two writers), restarts, bad files."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from framework import memory
from framework.memory import db as db_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A short scripted history every store must keep the same across a restart (here) and across backends
# (tests/test_memory_pg.py).
SCRIPT_EVENTS = (
    "set kobu to 12.",
    "the sky looks grey today.",
    "set lima to 5.",
    "change kobu to 40.",
    "remember to check kobu.",
    "set pato to 7.",
    "drop lima.",
)
SCRIPT_QUERIES = ("what is kobu now?", "what is lima now?", "what was kobu on day 2?")

# A writer process: writes `n` events to a store and prints each committed item id (after the commit returns).
WRITER = textwrap.dedent("""
    import sys
    from framework import memory
    kind, path, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = memory.STORES[kind](path)
    for i in range(n):
        r = store.write(memory.Event(f"set {tag}x{'abcdefghij'[i % 10]}y to {i % 100}.", time=float(i)))
        print(r.item_ids[0], i, flush=True)
    store.close()
""")


def _writer(kind, path, tag, n):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, str(path), tag, str(n)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


@pytest.mark.parametrize("kind", ["vector", "facts"])
def test_sigkill_mid_stream_loses_no_committed_memory(tmp_path, kind):
    path = tmp_path / "m.db"
    proc = _writer(kind, path, "k", 100_000)
    committed = []
    for line in proc.stdout:
        committed.append(tuple(int(x) for x in line.split()))
        if len(committed) == 150:
            break
    os.kill(proc.pid, signal.SIGKILL)  # a real kill: no atexit, no close, the WAL is left as it was
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with memory.STORES[kind](path) as store:
        assert store.db.integrity_check() == "ok"
        rows = {a["id"]: a for a in store.audit()}
        for item_id, i in committed:  # every write the process saw committed is there, whole
            assert item_id in rows, (item_id, i)
            if kind == "vector":
                assert rows[item_id]["text"] == f"set kx{'abcdefghij'[i % 10]}y to {i % 100}."
        # The store keeps working after the crash.
        assert store.write(memory.Event("set zed to 1.", time=1e6)).item_ids


def test_two_writer_processes_never_corrupt(tmp_path):
    path = tmp_path / "m.db"
    memory.VectorStore(path).close()  # created once, so both writers open an existing file
    procs = [_writer("vector", path, tag, 150) for tag in ("p", "q")]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ids = [int(line.split()[0]) for out in outs for line in out.splitlines()]
    assert len(ids) == len(set(ids)) == 300
    with memory.VectorStore(path) as store:
        assert store.db.integrity_check() == "ok"
        assert len(store) == 300
        texts = [a["text"] for a in store.audit()]
        assert sum(t.startswith("set px") for t in texts) == sum(t.startswith("set qx") for t in texts) == 150
        # Every item has its embedding: the vector rows were written in the same transactions.
        assert len(store.db.query("SELECT rowid FROM vec_items")) == 300


@pytest.mark.parametrize("kind", sorted(memory.STORES))
def test_reopen_after_restart_gives_same_retrievals(tmp_path, kind):
    path = tmp_path / f"{kind}.db"
    store = memory.STORES[kind](path)
    for t, text in enumerate(SCRIPT_EVENTS):
        store.write(memory.Event(text, time=float(t), session=t // 3))
    before = [[(i.id, i.text, round(i.score, 6)) for i in store.retrieve(q, 3)] for q in SCRIPT_QUERIES]
    store.close()
    with memory.STORES[kind](path) as again:
        after = [[(i.id, i.text, round(i.score, 6)) for i in again.retrieve(q, 3)] for q in SCRIPT_QUERIES]
    assert after == before and any(before)


def test_approx_index_persists_and_catches_up(tmp_path):
    path = tmp_path / "v.db"
    store = memory.VectorStore(path, index="approx")
    for t in range(20):
        store.write(memory.Event(f"set v{'abcdefghijklmnopqrst'[t]}x to {t}.", time=t))
    top = [i.id for i in store.retrieve("what is vcx now?", 3)]
    store.close()
    assert os.path.exists(str(path) + ".usearch")
    other = memory.VectorStore(path)  # another process's writes (exact store on the same file) ...
    new = other.write(memory.Event("set vcx to 99.", time=30)).item_ids[0]
    other.close()
    with memory.VectorStore(path, index="approx") as again:  # ... are found by the reloaded approximate index
        got = [i.id for i in again.retrieve("what is vcx now?", 4)]
        assert set(top) <= set(got) and new in got


def test_transaction_is_all_or_nothing(tmp_path):
    store = memory.VectorStore(tmp_path / "t.db")
    store.write(memory.Event("set kobu to 1.", time=0))
    with pytest.raises(RuntimeError):
        with store.db.transaction():
            store.db.execute("INSERT INTO items (kind, text, time, recorded_at) VALUES ('event', 'half', 1, 1)")
            raise RuntimeError("crash between the item and its embedding")
    assert [a["text"] for a in store.audit()] == ["set kobu to 1."]
    # A bad embedding aborts the whole batch: no item of it lands.
    with pytest.raises(ValueError, match="embeddings of shape"):
        store.write_many(
            [memory.Event("set a to 1.", time=1), memory.Event("set b to 2.", time=1)],
            vectors_ND=[[0.0] * store.embedder.dim],
        )
    assert len(store.audit()) == 1 and store.db.integrity_check() == "ok"
    store.close()


def test_newer_schema_is_refused_and_older_migrates_explicitly(tmp_path):
    newer = tmp_path / "newer.db"
    memory.FullContextStore(newer).close()
    conn = db_lib._connect(str(newer), 1000)
    conn.execute(f"PRAGMA user_version = {memory.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(memory.SchemaVersionError, match="newer than this Lumen"):
        memory.FullContextStore(newer)

    old = tmp_path / "old.db"
    db_lib.create_at_version(str(old), "full_context", 1)
    with pytest.raises(memory.SchemaVersionError, match=r"schema version 1, older.*migrate"):
        memory.FullContextStore(old)
    assert memory.migrate(str(old)) == 1
    assert os.path.exists(str(old) + ".v1.bak")
    with memory.FullContextStore(old, capacity=1) as store:  # the v2 columns (uses, expiry) now exist
        store.write(memory.Event("set a to 1.", time=0))
        store.write(memory.Event("set b to 2.", time=1))
        assert [i.text for i in store.retrieve("a", 5)] == ["set b to 2."]
    assert memory.migrate(str(old)) == memory.SCHEMA_VERSION  # already current: left alone

    also_old = tmp_path / "also_old.db"
    db_lib.create_at_version(str(also_old), "facts", 1, embed_dim=256)
    with memory.FactStore(also_old, migrate=True) as store:
        assert store.write(memory.Event("set a to 1.", time=0)).decisions == (("ADD", "a", 1),)


def test_damaged_and_foreign_files_get_clear_errors(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(memory.MemoryDBError, match="not a readable SQLite memory store"):
        memory.FactStore(junk)

    good = tmp_path / "good.db"
    with memory.FullContextStore(good) as store:
        for t in range(50):
            store.write(memory.Event(f"chat line {t} about the weather.", time=t))
        store.db.checkpoint()
    data = bytearray(good.read_bytes())
    data[:16] = b"\0" * 16  # a smashed header
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(bytes(data))
    with pytest.raises(memory.MemoryDBError, match="damaged"):
        memory.FullContextStore(damaged)

    with pytest.raises(memory.MemoryDBError, match="belongs to a 'full_context' store"):
        memory.VectorStore(good)
    with pytest.raises(memory.MemoryDBError, match="embedder"):
        with memory.VectorStore(tmp_path / "v.db", embedder=memory.HashEmbedder(64)):
            pass
        memory.VectorStore(tmp_path / "v.db", embedder=memory.HashEmbedder(32))
    with pytest.raises(memory.MemoryDBError, match="is a directory"):
        memory.FullContextStore(tmp_path)
    with pytest.raises(memory.MemoryDBError, match="does its folder exist"):
        memory.FullContextStore(tmp_path / "no" / "such" / "m.db")
