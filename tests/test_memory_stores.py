"""Each memory store's write / retrieve / forget semantics on scripted events, and the bad-input errors."""

import numpy as np
import pytest

from framework import memory
from framework.memory import Event


def _script(store, texts, start=0):
    return [store.write(Event(t, time=float(start + i))) for i, t in enumerate(texts)]


def test_fact_store_decisions_supersede_and_keep(tmp_path):
    with memory.FactStore(tmp_path / "f.db") as store:
        res = _script(
            store,
            [
                "set kobu to 12.",
                "the sky looks grey.",
                "kobu is still 12.",
                "change kobu to 40.",
                "set lima to 5.",
                "drop lima.",
                "drop zed.",
            ],
        )
        ops = [d[0] for r in res for d in r.decisions]
        assert ops == ["ADD", "NOOP", "UPDATE", "ADD", "DELETE", "NOOP"]
        assert [i.render() for i in store.retrieve("what is kobu now?", 5)] == ["day 3-now: kobu = 40"]
        audit = {a["text"]: a for a in store.audit()}
        old, new = audit["kobu = 12"], audit["kobu = 40"]
        assert (old["status"], old["hidden_reason"], old["superseded_by"]) == ("hidden", "superseded", new["id"])
        assert (audit["lima = 5"]["status"], audit["lima = 5"]["hidden_reason"]) == ("hidden", "deleted")
        assert len(store) == 1 and len(store.audit()) == 3
        assert store.decisions()[-1] == ("NOOP", "zed", None)


def test_temporal_store_answers_as_of(tmp_path):
    with memory.TemporalStore(tmp_path / "t.db") as store:
        store.write(Event("set kobu to 12.", time=1))
        store.write(Event("change kobu to 40.", time=5))
        store.write(Event("change kobu to 41.", time=5))  # the same day: [5, 5) is empty, 41 holds from 5
        store.write(Event("drop kobu.", time=9))
        store.write(Event("set kobu to 3.", time=3))  # a late-arriving fact slots into [3, 5)

        def at(t, **kw):
            return [i.text for i in store.retrieve("kobu", 10, as_of=t, **kw)]

        assert at(0) == [] and at(1) == at(2) == ["kobu = 12"]
        assert at(3) == at(4.9) == ["kobu = 3"]
        assert at(5) == at(8) == ["kobu = 41"] and at(9) == at(100) == []
        assert [(i.text, i.valid_from, i.valid_to) for i in store.history("kobu")] == [
            ("kobu = 12", 1, 3),
            ("kobu = 3", 3, 5),
            ("kobu = 41", 5, 9),
        ]
        # Transaction time: before the drop (recorded at 9) and the late fact were known, 41 was open-ended
        # and 12 still held on day 4.
        assert at(20, known_at=8) == ["kobu = 41"] and at(4, known_at=8) == ["kobu = 12"]
        assert [i.valid_to for i in store.retrieve("kobu", 10, as_of=6, known_at=8)] == [None]
        for bad in (float("nan"), True, "4"):
            with pytest.raises(ValueError, match="as_of = .*expected a finite number"):
                at(bad)
            with pytest.raises(ValueError, match="known_at = .*expected a finite number"):
                at(4, known_at=bad)
        audit = store.audit()  # invalidated row versions are kept, never hidden or deleted
        # 12 [1,-), 40 [5,-), 12 [1,5), 41 [5,-), 41 [5,9), 12 [1,3), 3 [3,5): four versions retired on the way.
        assert all(a["status"] == "active" for a in audit) and len(audit) == 7
        retired = [r[0] for r in store.db.query("SELECT id FROM items WHERE invalidated_at IS NOT NULL")]
        assert len(retired) == 4 and "kobu = 40" in [a["text"] for a in audit]
        assert [d[0] for d in store.decisions()] == ["ADD", "UPDATE", "UPDATE", "DELETE", "UPDATE"]


def test_ttl_hides_but_keeps(tmp_path):
    with memory.VectorStore(tmp_path / "v.db", ttl=3.0) as store:
        _script(store, ["set kobu to 1.", "set lima to 2.", "set pato to 3.", "set zeta to 4."])  # times 0..3
        assert sorted(i.text for i in store.retrieve("set", 10)) == [
            "set lima to 2.",
            "set pato to 3.",
            "set zeta to 4.",
        ]
        assert len(store.retrieve("set", 10, now=0.5)) == 4  # as seen at an earlier time, nothing had expired
        assert len(store.audit()) == 4 and store.audit()[0]["expires_at"] == 3.0
    with memory.FullContextStore(tmp_path / "f.db") as store:
        _script(store, ["a b c.", "d e f.", "g h i."])
        assert store.forget(memory.TTL(1.5), now=2.0) == 1  # the item of time 0 is older than 2 - 1.5
        assert [i.text for i in store.retrieve("x", 5)] == ["d e f.", "g h i."]
        a = store.audit()[0]
        assert (a["text"], a["status"], a["hidden_reason"], a["hidden_at"]) == ("a b c.", "hidden", "expired", 2.0)


def test_capacity_evicts_least_used(tmp_path):
    with memory.VectorStore(tmp_path / "v.db") as store:
        _script(store, ["set kobu to 1.", "set lima to 2.", "set pato to 3."])
        store.retrieve("kobu", 1)
        store.retrieve("kobu", 1)
        store.retrieve("pato", 1)
        assert store.forget(memory.Capacity(2)) == 1
        assert sorted(i.text for i in store.retrieve("set", 5)) == ["set kobu to 1.", "set pato to 3."]
        assert [a["hidden_reason"] for a in store.audit()] == [None, "evicted", None]
    with memory.RecentWindowStore(tmp_path / "w.db", capacity=2, window=10) as store:  # enforced on write
        _script(store, ["one.", "two.", "three."])
        assert [i.text for i in store.retrieve("x", 5)] == ["three.", "two."]  # never used: oldest goes first


def test_explicit_supersede_and_delete(tmp_path):
    with memory.FactStore(tmp_path / "f.db") as store:
        _script(store, ["set kobu to 1.", "set lima to 2."])
        assert store.forget(memory.Supersede(key="kobu")) == 1
        assert [i.text for i in store.retrieve("kobu", 5)] == ["lima = 2"]
        lima = store.retrieve("lima", 1)[0].id
        assert store.forget(memory.Delete(item_ids=(lima,))) == 1 and store.retrieve("lima", 5) == []
        with pytest.raises(ValueError, match=rf"Delete.item_ids: \[{lima}\] are not active"):
            store.forget(memory.Delete(item_ids=(lima,)))
        with pytest.raises(ValueError, match="expected TTL, Capacity, Supersede or Delete"):
            store.forget("everything")
        assert len(store.audit()) == 2


def test_window_full_context_and_core_archival(tmp_path):
    texts = ["set kobu to 1.", "set lima to 2.", "chat about the river.", "change kobu to 3."]
    with memory.RecentWindowStore(tmp_path / "w.db", window=2) as store:
        _script(store, texts)
        assert [i.text for i in store.retrieve("kobu", 5)] == ["change kobu to 3.", "chat about the river."]
    with memory.FullContextStore(tmp_path / "f.db") as store:
        _script(store, texts)
        assert [i.text for i in store.retrieve("kobu", 1)] == texts
    with memory.CoreArchivalStore(tmp_path / "c.db", core_chars=20) as store:
        res = _script(store, texts + ["set pato to 44.", "drop lima."])
        assert [d[0] for r in res for d in r.decisions] == [
            "CORE_APPEND",
            "CORE_APPEND",
            "CORE_REPLACE",
            "CORE_APPEND",
            "NOOP",
        ]
        # 20 characters hold two lines: appending pato evicted the oldest line (lima), so its drop found nothing.
        assert store.core() == ["kobu = 3", "pato = 44"]
        assert ("CORE_EVICT", None, None) in store.decisions()
        items = store.retrieve("what is kobu now?", 2)
        assert [i.kind for i in items] == ["core", "core", "event", "event"]
        assert {i.text for i in items[2:]} == {"set kobu to 1.", "change kobu to 3."}
        store.core_replace("pato = 44", "pato = 45")
        store.core_append("tea")  # 22 characters: the oldest line goes
        assert store.core() == ["pato = 45", "tea"]
        with pytest.raises(ValueError, match="is not a line of the core block"):
            store.core_replace("zzz", "y")


@pytest.mark.parametrize("kind", ["full_context", "recent_window", "vector", "vector_approx", "linked_notes"])
def test_until_keeps_to_what_was_said_by_then(tmp_path, kind):
    texts = ["set kobu to 1.", "set lima to 2.", "change kobu to 3.", "change kobu to 5.", "drop lima."]
    store = (
        memory.VectorStore(tmp_path / "a.db", index="approx")
        if kind == "vector_approx"
        else memory.STORES[kind](tmp_path / "s.db")
    )
    with store:
        assert store.time_query == "until"
        _script(store, texts)  # days 0-4
        for until in (0, 2, 2.5, 4):
            got = store.retrieve("what was kobu on day 2?", 8, until=until)
            assert got and {i.text for i in got} <= set(texts[: int(until) + 1]), (until, got)
        assert "change kobu to 3." in {i.text for i in store.retrieve("kobu", 8, until=2)}  # day 2 itself
        assert store.retrieve("kobu", 8, until=-1) == []
        assert len(store.retrieve("kobu", 8)) == len(store.retrieve("kobu", 8, until=4))
        for bad in (float("nan"), float("inf"), True, "3"):
            with pytest.raises(ValueError, match="until = .*expected a finite number"):
                store.retrieve("kobu", 3, until=bad)


def test_linked_notes_link_and_evolve(tmp_path):
    with memory.LinkedNotesStore(tmp_path / "n.db", links=2) as store:
        a = store.write(Event("set kobu to 1.", time=0)).item_ids[0]
        b = store.write(Event("the garden looks calm.", time=1)).item_ids[0]
        c = store.write(Event("remember to check kobu in the garden.", time=2)).item_ids[0]
        assert store.linked(c) == [a, b] and store.linked(a) == [c] and store.linked(b) == [c]
        assert store.tags(a) == ["garden", "kobu"]  # evolved: took in the new note's keywords
        got = store.retrieve("kobu", 3)
        assert {i.id for i in got} == {a, b, c} and got[-1].id == b  # b only through its link
    with pytest.raises(ValueError, match="no such note"):
        with memory.LinkedNotesStore(tmp_path / "n.db", links=2) as store:
            store.tags(999)


def test_approx_matches_exact_on_a_small_store(tmp_path):
    rng = np.random.default_rng(0)
    x_ND = rng.standard_normal((500, 16)).astype(np.float32)
    emb = memory.HashEmbedder(16)
    events = [Event(f"item {i}.", time=float(i)) for i in range(500)]
    with (
        memory.VectorStore(tmp_path / "e.db", embedder=emb) as exact,
        memory.VectorStore(tmp_path / "a.db", embedder=emb, index="approx") as approx,
    ):
        exact.write_many(events, x_ND)
        approx.write_many(events, x_ND)
        q_QD = rng.standard_normal((20, 16)).astype(np.float32)
        e = np.array([[i.id for i in exact.retrieve_vector(q, 10)] for q in q_QD])
        a = np.array([[i.id for i in approx.retrieve_vector(q, 10)] for q in q_QD])
        brute = (
            np.argsort(
                -(q_QD / np.linalg.norm(q_QD, axis=1, keepdims=True))
                @ (x_ND / np.linalg.norm(x_ND, axis=1, keepdims=True)).T,
                axis=1,
            )[:, :10]
            + 1
        )
        np.testing.assert_array_equal(e, brute)  # sqlite-vec's KNN is exact
        assert memory.recall_at_k(e, a) >= 0.95


@pytest.mark.parametrize("kind", sorted(memory.STORES))
def test_bad_input_gets_clear_errors(tmp_path, kind):
    with memory.STORES[kind](tmp_path / "b.db") as store:
        store.write(Event("set kobu to 1.", time=0))
        for k in (0, -3, 1.5, True, None):
            with pytest.raises(ValueError, match=r"k = .*expected a positive integer"):
                store.retrieve("kobu", k)
        with pytest.raises(ValueError, match=r"query: character 'é' at position 5 is not in the 'text' tokenizer"):
            store.retrieve("what é", 3)
        with pytest.raises(ValueError, match=r"event.text: character '\\x00'"):
            store.write(Event("bad \x00 byte", time=1))
        with pytest.raises(ValueError, match="query = ''; expected a non-empty string"):
            store.retrieve("", 3)
        with pytest.raises(ValueError, match="event.time = nan"):
            store.write(Event("fine text.", time=float("nan")))
        with pytest.raises(ValueError, match="expected a framework.memory.Event"):
            store.write("set kobu to 2.")
        assert len(store.audit()) == len(store.audit()) and store.db.integrity_check() == "ok"
    for bad in (dict(ttl=0), dict(capacity=0), dict(capacity=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            memory.STORES[kind](tmp_path / "c.db", **bad)


def test_lm_embedder_from_hidden_states(tmp_path):
    import jax

    from framework.models import lm

    cfg = lm.LMConfig(
        vocab_size=100,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        d_ff=32,
        max_seq_len=64,
        tokenizer="text",
    )
    emb = memory.LMEmbedder(lm.init(cfg, jax.random.key(0)), cfg, batch_size=4)
    x_ND = emb(["set kobu to 1.", "chat about the river.", "set kobu to 1."])
    assert x_ND.shape == (3, 16) and np.allclose(np.linalg.norm(x_ND, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(x_ND[0], x_ND[2])  # padding and batch position do not change an embedding
    with memory.VectorStore(tmp_path / "lm.db", embedder=emb) as store:
        _script(store, ["set kobu to 1.", "chat about the river.", "drop lima."])
        assert store.retrieve("chat about the river.", 1)[0].text == "chat about the river."
        with pytest.raises(ValueError, match="'é'"):
            store.retrieve("é", 1)
    with pytest.raises(ValueError, match="unknown hookpoint"):
        memory.LMEmbedder(None, cfg, hookpoint="blocks.7.mlp")
