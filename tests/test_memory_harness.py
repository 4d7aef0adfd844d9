"""The ledger-dialogue harness: deterministic histories, exact answers, the rule-based reader, the evaluation loop."""

import dataclasses

import pytest

from framework import memory
from framework.memory import harness
from framework.memory.ledger import extract_facts


def _lines(events):
    return [f"day {e.time:g}: {e.text}" for e in events]


def test_ledger_is_deterministic_and_covers_every_ability():
    a, b = harness.make_ledger(3, 200), harness.make_ledger(3, 200)
    assert a == b and harness.make_ledger(4, 200).events != a.events
    assert len(a.events) == 200 and {e.session for e in a.events} == set(range(25))
    assert {ab: sum(q.ability == ab for q in a.questions) for ab in harness.ABILITIES} == dict.fromkeys(
        harness.ABILITIES, 4
    )
    assert all(q.answer == "unknown" for q in a.questions if q.ability == "abstention")
    assert all(q.answer.isdigit() for q in a.questions if q.ability != "abstention")


@pytest.mark.parametrize("n", [10, 60, 400])
def test_rule_reader_answers_every_question_from_the_whole_history(n):
    ledger = harness.make_ledger(0, n, questions_per_ability=6)
    lines = _lines(ledger.events)
    assert [harness.rule_reader(q.text, lines) for q in ledger.questions] == [q.answer for q in ledger.questions]
    # The answers depend on the history: with the history cut to its last 20 lines, some are lost.
    if n == 400:
        assert [harness.rule_reader(q.text, lines[-20:]) for q in ledger.questions] != [
            q.answer for q in ledger.questions
        ]


def test_rule_reader_reads_fact_and_core_lines():
    lines = ["core: lima = 9", "day 1-5: kobu = 12", "day 5-now: kobu = 40", "day 2-4: pato = 3"]
    r = harness.rule_reader
    assert (r("what is kobu now?", lines), r("what was kobu on day 4?", lines), r("what is lima now?", lines)) == (
        "40",
        "12",
        "9",
    )
    assert r("what is pato now?", lines) == "unknown" and r("what is kobu plus lima now?", lines) == "49"
    with pytest.raises(ValueError, match="expected one of the ledger question forms"):
        r("how are you?", lines)


def test_context_is_filled_by_rank_and_shown_in_time_order():
    items = [
        memory.Item(1, "set kobu to 12.", 0.9, 1.0, "event"),
        memory.Item(2, "the sky looks grey today.", 0.1, 2.0, "event"),
        memory.Item(3, "change kobu to 40.", 0.8, 3.0, "event"),
        memory.Item(0, "lima = 7", 2.0, 0.0, "core"),
    ]
    budget = sum(len(s) + 1 for s in ("core: lima = 7", "day 1: set kobu to 12.", "day 3: change kobu to 40."))
    lines = harness.render_context(items, budget)
    assert lines == ["core: lima = 7", "day 1: set kobu to 12.", "day 3: change kobu to 40."]  # the chatter lost
    assert harness.render_context(items, None)[1:] == [
        "day 1: set kobu to 12.",
        "day 2: the sky looks grey today.",
        "day 3: change kobu to 40.",
    ]
    same = [dataclasses.replace(it, score=1.0) for it in items[:3]]  # equal scores: the most recent survive
    assert harness.render_context(same, 60) == ["day 2: the sky looks grey today.", "day 3: change kobu to 40."]


def test_evaluate_shows_what_each_store_keeps(tmp_path):
    ledger = harness.make_ledger(1, 240)

    def run(kind, **kw):
        with memory.STORES[kind](tmp_path / f"{kind}.db") as store:
            return harness.evaluate(store, ledger, k=8, **kw)

    full = run("full_context", budget=None)
    assert full["accuracy"]["all"] == 1.0  # the whole history, read whole: every answer
    assert run("full_context", budget=256)["accuracy"]["all"] < 1.0  # cut to the reader's window
    facts = run("facts")
    assert facts["accuracy"]["temporal"] == 0.0  # only current values are kept, and the asked day's value differs
    assert facts["accuracy"]["update"] == 1.0
    temporal = run("temporal")
    assert temporal["accuracy"]["temporal"] == 1.0 and temporal["accuracy"]["update"] == 1.0
    assert run("temporal", time_aware=True)["accuracy"]["temporal"] == 1.0
    assert run("recent_window")["accuracy"]["multi_session"] == 0.0
    assert facts["tokens_read"]["all"] < full["tokens_read"]["all"]
    assert all(r["tokens_read"] > 0 for r in facts["records"])


def test_time_aware_questions_narrow_retrieval_to_the_asked_day(tmp_path):
    ledger = harness.make_ledger(1, 240)
    at = [q for q in ledger.questions if q.ability == "temporal"]
    assert at and harness.asked_day(at[0].text) == float(at[0].text.split()[-1][:-1])
    assert harness.asked_day("what is kobu now?") is None
    with memory.TemporalStore(tmp_path / "t.db") as t, memory.FactStore(tmp_path / "f.db") as f:
        assert harness.time_filter(t, "what was kobu on day 4?") == {"as_of": 4.0}
        assert harness.time_filter(t, "what is kobu now?") == {}
        assert harness.time_filter(f, "what was kobu on day 4?") == {}  # it keeps only the present
        for q, lines in harness.ask(t, ledger, k=8, budget=96, time_aware=True):
            if harness.asked_day(q) is not None:  # only the interval holding the day: one line of the asked name
                name = harness.asked_names(q)[0]
                assert len([x for x in lines if x.endswith(f": {name} = {x.split()[-1]}")]) == 1, (q, lines)
    with memory.VectorStore(tmp_path / "v.db") as v:
        assert harness.time_filter(v, "what was kobu on day 4?") == {"until": 4.0}
        plain = dict(harness.ask(v, ledger, k=8, budget=96))
        timed = dict(harness.ask(v, ledger, k=8, budget=96, write=False, time_aware=True))
    for q in ledger.questions:
        day = harness.asked_day(q.text)
        if day is None:
            assert timed[q.text] == plain[q.text]
        else:
            assert all(float(x.split(":")[0].split()[1]) <= day for x in timed[q.text])
            gold = harness.gold_context(ledger, q, 96, time_aware=True)
            assert gold and all(float(x.split(":")[0].split()[1]) <= day for x in gold)
            assert harness.rule_reader(q.text, gold) == q.answer


def test_bad_ledger_arguments():
    with pytest.raises(ValueError, match="n_events = 0"):
        harness.make_ledger(0, 0)
    with pytest.raises(ValueError, match="per_session = 0"):
        harness.make_ledger(0, 5, per_session=0)


def test_no_variable_is_named_like_a_word_of_the_chit_chat():
    # Seed 0's 3000-event history once named a variable "fine", which "lunch was fine." also mentions: its
    # lines then read as the variable's, and even the rule reader answered it wrong.
    ledger = harness.make_ledger(0, 3000, questions_per_ability=20)
    names = {f.key for e in ledger.events for f in extract_facts(e.text)}
    assert len(names) > 100 and not names & harness._NOT_NAMES
    lines = _lines(ledger.events)
    assert [harness.rule_reader(q.text, lines) for q in ledger.questions] == [q.answer for q in ledger.questions]


def test_asked_names_and_gold_context_match_names_not_day_numbers():
    assert harness.asked_names("what is kobu plus lima now?") == ["kobu", "lima"]
    assert harness.asked_names("what was kobu on day 4?") == ["kobu"]
    with pytest.raises(ValueError, match="ledger question forms"):
        harness.asked_names("how is kobu?")
    events = (
        memory.Event("set kobu to 12.", 1.0),
        memory.Event("set lima to 4.", 2.0),  # its value equals the asked day: not a line about kobu
        memory.Event("change kobu to 40.", 5.0),
    )
    q = harness.Question("temporal", "what was kobu on day 4?", "12")
    ledger = harness.Ledger(0, events, (q,))
    assert harness.gold_context(ledger, q, budget=None) == ["day 1: set kobu to 12.", "day 5: change kobu to 40."]


def test_error_causes_name_what_a_wrong_answer_read():
    from scripts.reproduce.memory_errors import cause

    facts = ["day 1-now: zogi = 5", "day 2-now: kobu = 7"]
    assert cause("what is kobu now?", facts, "7", "7", "kobu = 7") is None
    assert cause("what is fogi now?", facts, "unknown", "5", "fogi = 5") == "near_namesake"
    assert cause("what is kobu now?", facts, "7", "unknown", "kobu = unknown") == "abstained"
    assert cause("what is kobu now?", facts, "7", "77", "kobu = 77") == "other"
    assert cause("what is lima now?", facts, "3", "unknown", "lima = unknown") == "lost"  # no line holds it
    events = ["day 100: set kobu to 4.", "day 250: change kobu to 9."]
    q = "what was kobu on day 203?"
    assert cause(q, events, "4", "9", "kobu on day 20 = 9") == "wrong_day"
    assert cause(q, events, "4", "9", "kobu on day 203 = 9") == "wrong_line"


def test_answer_line_says_where_the_line_holding_the_day_sits():
    from scripts.reproduce.memory_errors import answer_line

    events = ["day 3: set kobu to 4.", "day 5: remember to check kobu.", "day 8: kobu is still 4.", "day 9: drop kobu."]
    assert [answer_line(f"what was kobu on day {d}?", events) for d in (2, 4, 8, 30)] == [
        None,
        "first",
        "middle",
        "last",
    ]
    facts = ["day 2-6: kobu = 1", "day 6-now: kobu = 2", "day 1-now: lima = 3"]
    assert [answer_line(f"what was {k} on day 7?", facts) for k in ("kobu", "lima")] == ["last", "only"]
    assert answer_line("what is kobu now?", facts) is None
