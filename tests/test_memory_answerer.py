"""The LM answerer: its training stream (exact read answers), the reader over `generate`, the experiment's checks."""

import re

import jax
import numpy as np
import pytest

from configs.memory import answerer as answerer_config
from framework import config as config_lib
from framework.memory import answerer, harness, reading
from framework.models import lm
from framework.tasks.tokenizer import TEXT_TOKENIZER
from scripts.reproduce import memory_errors


def _split(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """An example's context lines and its (question, answer) pairs."""
    rows = text.rstrip("\n").split("\n")
    first = next(i for i, r in enumerate(rows) if r.startswith("Q: "))
    qa = rows[first:]
    assert all(q.startswith("Q: ") and a.startswith("A: ") for q, a in zip(qa[::2], qa[1::2])) and len(qa) % 2 == 0
    return rows[:first], [(q[3:], a[3:]) for q, a in zip(qa[::2], qa[1::2])]


def _trigrams(name: str) -> set[str]:
    w = f"#{name}#"
    return {w[i : i + 3] for i in range(len(w) - 2)}


def test_near_names_share_trigrams_with_the_name():
    rng = np.random.default_rng(0)
    for name in ("dabo", "tike", "risepa", "kazabo"):
        got = harness.near_names(rng, name, 6, avoid={"dazo", "sepa"})
        assert len(set(got)) == 6 and name not in got and not {"dazo", "sepa"} & set(got)
        for other in got:  # a ledger name: 2 to 4 consonant-vowel syllables, what a trigram search ranks beside it
            assert re.fullmatch(r"([bdfgklmnprstvz][aeiou]){2,4}", other) and _trigrams(other) & _trigrams(name)
    with pytest.raises(ValueError, match="consonant-vowel"):
        harness.near_names(rng, "kobuu", 2)
    with pytest.raises(ValueError, match="near"):
        reading.reading_source(128, near=1.5)


@pytest.mark.parametrize("near", [0.0, 1.0])
def test_reading_examples_are_exact_and_deterministic(near):
    source = reading.reading_source(budget=128, near=near)
    exs = [source.example(7, i) for i in range(60)]
    assert exs == [source.example(7, i) for i in range(60)]
    lines = ["day 1: set kobu to 12.", "day 2-now: lima = 7"]
    assert [answerer.worked_answer(q, lines) for q in ("what is kobu plus lima now?", "what was kobu on day 3?")] == [
        "kobu + lima = 12 + 7: 2+7=9, 1+0+0=1 = 19",
        "kobu on day 3 = 12",
    ]
    assert answerer.worked_answer("what is kobu plus pato now?", lines) == "kobu + pato = 12 + unknown = unknown"
    # Sums are written in columns, units first, each column with the carry; the total is the last field.
    assert [answerer.column_sum(a, b) for a, b in ((58, 26), (3, 99), (0, 0))] == [
        "8+6=14, 5+2+1=8",
        "3+9=12, 0+9+1=10",
        "0+0=0",
    ]
    for a, b in np.random.default_rng(0).integers(0, 100, (50, 2)):
        ls = [f"day 1: set kobu to {a}.", f"day 2: set lima to {b}."]
        assert answerer.final_answer(answerer.worked_answer("what is kobu plus lima now?", ls)) == str(a + b)
    for ex in exs:
        assert ex.prompt.endswith("A:") and ex.completion.startswith(" ")
        lines, qa = _split(ex.prompt + ex.completion)
        assert [a for _, a in qa] == [answerer.worked_answer(q, lines) for q, _ in qa]
        # The answer is what the context supports.
        assert [answerer.final_answer(a) for _, a in qa] == [harness.rule_reader(q, lines) for q, _ in qa]
        assert sum(len(x) + 1 for x in lines) <= 128
        assert 1 + len(TEXT_TOKENIZER.encode(ex.prompt + ex.completion)) + 1 <= source.max_tokens
    answers = [answerer.final_answer(a) for ex in exs for _, a in _split(ex.prompt + ex.completion)[1]]
    assert 0.1 < np.mean([a == "unknown" for a in answers]) < 0.5 and len(set(answers)) > 10
    assert len(answers) > 1.3 * len(exs)  # several questions per context where they fit
    styles = {
        ("fact" if re.search(r"^day \S+-", ex.prompt, re.M) else "") + ("core" if "core: " in ex.prompt else "")
        for ex in exs
    }
    assert styles == {"", "fact", "core"}  # utterance, fact/interval and MemGPT-shaped contexts all occur
    # With `near`, the names of a context come in families that a trigram search ranks together.
    crowded = []
    for ex in exs:
        names = set(re.findall(r"\b(?:[bdfgklmnprstvz][aeiou]){2,4}\b", ex.prompt.split("\nQ: ")[0])) - {"fine"}
        if len(names) > 1:
            crowded.append(all(any(_trigrams(a) & _trigrams(b) for b in names - {a}) for a in names))
    assert np.mean(crowded) < 0.1 if near == 0.0 else np.mean(crowded) > 0.4


@pytest.fixture(scope="module")
def tiny_lm():
    """One tiny random text LM (config, params) for the tests that run a model: one init compile."""
    cfg = lm.LMConfig(
        vocab_size=100,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        d_ff=32,
        max_seq_len=128,
        tokenizer="text",
    )
    return cfg, lm.init(cfg, jax.random.key(0))


def test_lm_reader_answers_through_generate(tiny_lm):
    cfg, params = tiny_lm
    reader = answerer.LMReader(params, cfg, max_new_tokens=4, batch_size=2)
    pairs = [
        ("what is kobu now?", ["day 1: set kobu to 3."]),
        ("what is lima now?", []),
        ("what is kobu now?", ["day 1: set kobu to 3."]),
    ]
    got = reader.answer_batch(pairs)
    assert len(got) == 3 and got[0] == got[2] and all(isinstance(g, str) and "\n" not in g for g in got)
    assert reader(*pairs[0]) == got[0]  # the batch padding does not change a row's greedy answer
    with pytest.raises(ValueError, match="exceeds the answerer's max_seq_len 128"):
        reader("what is kobu now?", ["day 1: chat about the river and the garden again."] * 3)
    arith = lm.LMConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    with pytest.raises(ValueError, match="the answerer reads the text tokenizer"):
        answerer.LMReader(None, arith)


def test_scored_decision_takes_the_likelier_whole_answer(monkeypatch):
    import jax.numpy as jnp

    tok = TEXT_TOKENIZER
    proc = answerer.NoUnknown(*(int(t) for t in tok.encode("= u")))
    rows = [tok.encode("A: kobu = "), tok.encode("A: kobu ")]
    tokens_BS = jnp.asarray(np.stack([np.pad(r, (0, 12 - len(r))) for r in rows]))
    logits_BV = jnp.zeros((2, tok.vocab_size))
    out_BV = np.asarray(proc(logits_BV, tokens_BS, jnp.asarray([len(r) for r in rows])))
    u = tok.encode("u")[0]
    assert out_BV[0, u] == -np.inf and np.isfinite(np.delete(out_BV[0], u)).all() and np.isfinite(out_BV[1]).all()

    cfg = lm.LMConfig(vocab_size=100, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    greedy = (["kobu = unknown", "kobu = unknown", "lima = 5"], np.array([-3.0, -3.0, -1.0]))
    forced = (["kobu = 7", "kobu = 8", "lima = 6"], np.array([-2.0, -4.0, -0.5]))

    def fake(self, chunk, processors):
        assert len(chunk) == 4  # padded to the batch size
        return [x + "\n" for x in (forced if processors else greedy)[0]] + ["?"], np.append(
            (forced if processors else greedy)[1], 0.0
        )

    monkeypatch.setattr(answerer.LMReader, "_generate", fake)
    pairs = [("what is kobu now?", [])] * 3
    assert answerer.LMReader(None, cfg, batch_size=4).answer_batch(pairs) == ["unknown", "unknown", "5"]
    # "unknown" gives way only to a likelier number answer; a greedy number is never replaced.
    assert answerer.LMReader(None, cfg, batch_size=4, decision="scored").answer_batch(pairs) == ["7", "unknown", "5"]
    with pytest.raises(ValueError, match="decision = 'beam'"):
        answerer.LMReader(None, cfg, decision="beam")


def test_memory_config_is_checked_before_building():
    from experiments import memory as experiment

    config = answerer_config.get_config("size=tiny,steps=2")
    assert experiment.validate(config).tokenizer == "text"
    for path, value, match in (
        (("train", "seq_len"), 150, "train.seq_len"),
        (("task", "context_weight"), 1.5, "task.context_weight"),
        (("study", "stores"), ("vector", "graph"), "unknown stores"),
        (("study", "stores"), ("temporal+time", "facts+time"), r"unknown stores \['facts\+time'\]"),
        (("task", "budget"), 0, "task.budget"),
        (("task", "curriculum_steps"), (600, 500), "task.curriculum_steps"),
        (("study", "decisions"), ("greedy", "beam"), "study.decisions"),
        (("task", "max_vars"), 0, "task.max_vars"),
    ):
        bad = answerer_config.get_config("size=tiny,steps=2")
        with bad.unlocked():
            bad[path[0]][path[1]] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            experiment.validate(bad)
    with pytest.raises(ValueError, match="budget = 0"):
        reading.reading_source(0)
    with pytest.raises(ValueError, match="curriculum = "):
        reading.reading_source(96, curriculum=(5, 2))
    with pytest.raises(ValueError, match="max_vars = 0"):
        reading.reading_source(96, max_vars=0)
    # The curriculum's first stage is one-variable lookups, then plain lookups, then the mix.
    staged = reading.reading_source(96, curriculum=(4, 8))
    first = [staged.example(0, i).prompt.count("\n") for i in range(4)]
    assert first == [2] * 4  # one context line, then "Q: ..." and "A:"
    wide = reading.reading_source(200, curriculum=(0, 400), max_vars=5)
    names = [len(_variables(_split(wide.example(0, i).prompt + " x\n")[0])) for i in range(400)]
    assert max(names) == 5 and set(names) <= set(range(6))  # 1 to max_vars variables (none left if all dropped)


def _variables(lines: list[str]) -> set[str]:
    """The variable names in context lines (event, fact and core lines)."""
    pattern = r"^(?:day [\d.]+: (?:set|change|drop) |day [\d.?]+-[\d.now]+: |core: )?([a-z]+)"
    return {re.search(pattern, x).group(1) for x in lines}


def test_plain_drills_ask_every_form_and_the_latest_value_wins():
    source = reading.reading_source(128, easy=1.0)  # plain drills only
    kinds, multi, first_at, at_last, asides, later, one_fact = set(), 0, [], [], 0, [], 0
    for i in range(600):
        ex = source.example(3, i)
        lines, qa = _split(ex.prompt + ex.completion)
        assert [answerer.final_answer(a) for _, a in qa] == [harness.rule_reader(q, lines) for q, _ in qa]
        for q, a in qa:
            kinds.add(("sum" if " plus " in q else "at" if " on day " in q else "now", a.endswith("unknown")))
        names = [m.group(1) for x in lines if (m := re.match(r"^day [\d.]+: (?:set|change) ([a-z]+)", x))]
        multi += len(names) > len(set(names))  # a variable set, then changed: the latest line holds
        if " on day " in qa[0][0]:
            first_at.append(qa[0][1])
            name = harness.asked_names(qa[0][0])[0]
            values = [v for k, v in memory_errors.line_values(lines) if k == name]
            at_last.append(answerer.final_answer(qa[0][1]) == values[-1])
            day = harness.asked_day(qa[0][0])
            mine = [x for x in lines if re.search(rf"\b{name}\b", x)]
            later.append(any(float(re.match(r"^day ([\d.]+)", x).group(1)) > day for x in mine))
            spans = [(float(m.group(1)), m.group(2)) for x in mine if (m := re.match(r"^day ([\d.]+)-(\d+|now):", x))]
            one_fact += len(spans) == 1 and spans[0][0] <= day and (spans[0][1] == "now" or day < float(spans[0][1]))
        asides += any(re.match(r"^day \d+: (remember to check [a-z]+|[a-z]+ is still \d+)\.$", x) for x in lines)
    assert kinds >= {(k, False) for k in ("now", "sum", "at")} | {("now", True), ("sum", True)}
    assert multi > 50
    # The "as of" drill asks a day inside the variable's history: the answer is a value, never "unknown"; any of
    # the variable's lines can hold it, the last one too (no shortcut "not the latest line"). Half its contexts are
    # what a time-aware retrieval returns (`harness.time_filter`): no line after the day, or, in fact lines, the
    # one interval holding it; the others also show later lines, which the answer must skip.
    assert first_at and not any(a.endswith("unknown") for a in first_at)
    assert 0.5 < np.mean(at_last) < 0.95 and 0.1 < np.mean(later) < 0.5 and one_fact > 10
    # The ledger's utterances that set nothing new ("remember to check kobu.", "kobu is still 4.") are in drills.
    assert asides > 20
    # The curriculum: one variable with one value, then lookups among variables with one value each.
    staged = reading.reading_source(128, curriculum=(50, 100))
    contexts = [_split(staged.example(3, i).prompt + " x\n")[0] for i in range(100)]
    assert all(len(c) == 1 for c in contexts[:50])
    assert all(len(c) == len(_variables(c)) for c in contexts[50:]) and max(map(len, contexts[50:])) == 3
    # Near-namesakes come with the mix only: the lookup stages are those of a stream without them.
    near = reading.reading_source(128, curriculum=(50, 100), near=1.0)
    assert [near.example(3, i) for i in range(100)] == [staged.example(3, i) for i in range(100)]
    assert [near.example(3, i) for i in range(100, 120)] != [staged.example(3, i) for i in range(100, 120)]


def test_time_aware_contexts_change_only_the_as_of_examples(monkeypatch):
    source = reading.reading_source(128, curriculum=(20, 40), near=0.5)
    before = [source.example(5, i) for i in range(300)]
    monkeypatch.setattr(reading, "_TIME_AWARE", 0.0)
    after = [source.example(5, i) for i in range(300)]
    assert before[:40] == after[:40]  # the lookup stages ask no "as of" question
    same = [b == a for b, a in zip(before[40:], after[40:])]
    first_at = [" on day " in b.prompt.rsplit("Q: ", 1)[1] for b in before[40:]]
    assert all(s for s, at in zip(same, first_at) if not at) and not all(same)


def test_lookup_probe_asks_for_the_asked_variables_value(tiny_lm):
    sets = answerer.lookup_probe_examples((1, 3), count=8)
    assert sorted(sets) == ["n1_event", "n1_fact", "n3_absent", "n3_event", "n3_fact", "n3_near"]
    for key, (tokens_BT, at_B, gold_B) in sets.items():
        for row, at, gold in zip(tokens_BT, at_B, gold_B):
            text = TEXT_TOKENIZER.decode(row[1 : at + 1])
            body, answer = text.split("\nA: ")
            *lines, question = body.split("\n")
            assert len(lines) == int(key[1]) and question.startswith("Q: what is ")
            name = question.split()[3]
            assert answer == f"{name} = "  # scored right after the restated name
            truth = harness.rule_reader(question[3:], lines)
            assert truth.startswith(TEXT_TOKENIZER.decode([gold]))
            names = _variables(lines)
            assert (truth == harness.UNKNOWN) == key.endswith("absent") and (name in names) != key.endswith("absent")
            if key.endswith(("near", "absent")):  # near-namesakes: one name and edits of it, the asked one among them
                names |= {name}
                assert any(all(_trigrams(k) & _trigrams(c) for k in names - {c}) for c in names)
    cfg, params = tiny_lm
    got = answerer.lookup_probe(cfg, sets)(params)
    assert sorted(got) == [f"lookup_p_{k}" for k in sorted(sets)] and all(0.0 < p < 1.0 for p in got.values())


def test_training_batches_weight_the_answer_and_the_dialogue():
    from experiments import memory as experiment
    from framework.tasks import data

    config = answerer_config.get_config("size=tiny,steps=2,budget=64,context_weight=0.1")
    with config.unlocked():
        config.train.batch_size = 4
    source = reading.reading_source(64, (config.task.min_events, config.task.max_events))
    _, task = experiment.make_task(config)
    b = next(task.batches(0))
    assert set(b) == {"tokens", "loss_mask", "positions", "segment_ids"}  # packed rows
    answer = answerer.answer_mask(b["tokens"], b["segment_ids"])
    w = config.task.context_weight
    np.testing.assert_allclose(
        b["loss_mask"], np.where(b["segment_ids"] > 0, w + (1 - w) * answer, 0.0) * (b["positions"] > 0)
    )
    # With one question per example the answer mask equals the pipeline's completion mask, packed or not; with
    # several, it holds exactly the answers.
    one = reading.reading_source(64, (config.task.min_events, config.task.max_events), questions=1)
    for pack in (False, True):
        kw = dict(seed=0, batch_size=4, seq_len=176, pack=pack, num_batches=1)
        done, everything = (
            data.make_text_dataset(one, "text", **kw)[0],
            data.make_text_dataset(one, "text", loss_on="all", **kw)[0],
        )
        got = answerer.answer_mask(everything["tokens"], everything.get("segment_ids"))
        np.testing.assert_array_equal(got, done["loss_mask"])
        assert got.sum() >= 4 * 3
    rows = data.make_text_dataset(source, "text", seed=0, batch_size=4, seq_len=176, loss_on="all", num_batches=1)[0]
    got = answerer.answer_mask(rows["tokens"])
    for b in range(4):
        text = TEXT_TOKENIZER.decode(rows["tokens"][b][rows["tokens"][b] > 2])
        answers = "".join(f" {a}\n" for _, a in _split(text)[1])
        masked = rows["tokens"][b][got[b] > 0]
        assert TEXT_TOKENIZER.decode(masked[masked > 2]) == answers and masked[-1] == TEXT_TOKENIZER.eos_id


@pytest.mark.slow
def test_experiment_trains_and_runs_the_study(tmp_path):
    from experiments import memory as experiment

    config = answerer_config.get_config("size=tiny,steps=2,lengths=10,seeds=0")
    with config.unlocked():
        config.train.update(progress=False, eval_every=2, checkpoint_every=2)
        config.study.stores = ("facts", "vector_lm")
    out = experiment.run(config, str(tmp_path))
    assert {(r["store"], r["reader"]) for r in out["rows"]} == {
        (s, r) for s in ("facts", "vector_lm") for r in ("rule", "lm", "lm_scored")
    }
    assert (tmp_path / "figures" / "memory_lm.png").exists() and (tmp_path / "results" / "memory_study.json").exists()
