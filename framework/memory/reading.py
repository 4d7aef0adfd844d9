"""The LM answerer's training stream: store-shaped contexts and drills read from random ledgers, exact targets.

Ledgers from `harness.make_ledger` with contexts shaped like each store's (utterances as a vector store, window or
full context returns them, current facts as the fact store, validity intervals as the temporal store, core lines
plus utterances as MemGPT), built without a database so a batch is cheap; the target is the worked answer
(`answerer.worked_answer`) to what the context supports (`harness.rule_reader`), so the model learns to read, not
to guess: when the asked variable is absent the target is "unknown". A training example may ask up to three
questions of one context ("Q: ...\nA: ...\n" after the first answer): more lookups per token read. A share of
short drills of every question form (`_drill`: current values among updates, sums, "as of" days, absent
variables), a share of examples among near-namesakes (`harness.near_names`: what a similarity search over a long
history returns beside the asked name) and a curriculum over the stream (one-variable lookups first, then lookups
among variables with one value each, then the mix) give the model the copy, then the name match, before the rest.
Half the "as of day d" contexts are what a time-aware retrieval returns (`harness.time_filter`): utterances up to
day d, or the facts valid on it.
`reading_source` is the stream; `curriculum_indices` converts the curriculum's steps to example indices.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from framework.memory.answerer import ANSWER_TOKENS, format_prompt, worked_answer
from framework.memory.base import Item
from framework.memory.harness import (
    _NOT_NAMES,
    Ledger,
    Question,
    _names,
    asked_day,
    asked_names,
    make_ledger,
    near_names,
    render_context,
)
from framework.memory.ledger import extract_facts
from framework.tasks.data import TextExample, TextSource
from framework.tasks.tokenizer import TEXT_TOKENIZER

__all__ = [
    "LOOKUP_DRILLS",
    "MIN_TOKENS",
    "PLAIN_DRILLS",
    "curriculum_indices",
    "reading_example",
    "reading_source",
]


def _intervals(events) -> dict[str, list[tuple[float, float | None, int, float]]]:
    """key -> [(valid_from, valid_to or None, value, event time)] replayed from the utterances."""
    out: dict[str, list] = {}
    for e in events:
        for f in extract_facts(e.text):
            h = out.setdefault(f.key, [])
            if h and h[-1][1] is None and (f.op == "drop" or h[-1][2] != f.value):
                h[-1] = (h[-1][0], e.time, h[-1][2], h[-1][3])
            if f.op != "drop" and not (h and h[-1][1] is None and h[-1][2] == f.value):
                h.append((e.time, None, f.value, e.time))
    return out


def reading_example(
    seed: int,
    *,
    budget: int = 128,
    events: tuple[int, int] = (6, 64),
    questions: int = 3,
    easy: float = 0.5,
    max_tokens: int = 0,
    max_vars: int = 3,
    drills: dict | None = None,
    near: float = 0.0,
) -> TextExample:
    """One training example: a random ledger, a store-shaped context and 1 to `questions` questions read from it.

    The context is what a store's retrieval brings, filled by rank as `harness.render_context` does: the asked
    variables' items score high, 0-6 others low (a recency-ranked history, as full context and window stores give,
    in one example of eight), cut to `budget` tokens and shown oldest first; retrieved for an "as of" question, a
    share `_TIME_AWARE` of utterance and interval contexts keep only what a time-aware retrieval would. Every
    answer is what the context supports (`rule_reader`); values are uniform, so the lookup is the only way to
    predict a number. The first question is the one the context was retrieved for; the others (asked while the
    example fits `max_tokens`) read the same lines, adding answer targets at little cost. A fraction `easy` of the
    examples are plain drills (`_drill`, of the forms in `drills`): the steps the store-shaped questions build on.
    A fraction `near` of the examples (drills and store-shaped) name their variables by near-namesakes
    (`near_names`): what a similarity search over a long history puts beside the asked name, so the name must
    match in full.
    """
    rng = np.random.default_rng(seed)
    ledger = make_ledger(
        int(rng.integers(1 << 30)), int(rng.integers(events[0], events[1] + 1)), questions_per_ability=2
    )
    hard = near > 0 and rng.random() < near  # no draw at 0: the stream without near-namesakes is unchanged
    if hard:
        ledger = _with_namesakes(rng, ledger)
    style = int(rng.integers(4))
    hist = _intervals(ledger.events)
    live = sorted(k for k, h in hist.items() if h and h[-1][1] is None)
    if rng.random() < easy and live:
        return _drill(rng, hist, live, style, budget, questions, max_tokens, max_vars, drills or PLAIN_DRILLS, hard)
    # Abstention questions at a lower weight, or "unknown" would be near half the targets.
    weights = np.array([0.4 if q.ability == "abstention" else 1.0 for q in ledger.questions])
    order = rng.choice(len(weights), size=len(weights), replace=False, p=weights / weights.sum())
    qs = [ledger.questions[int(j)] for j in order[: max(1, int(questions))]]
    asked = set(asked_names(qs[0].text))
    recency = rng.random() < 0.125
    n_other = int(rng.integers(0, 7))

    def score(key) -> float:
        if recency:
            return 1.0
        return float(rng.uniform(0.5, 1.0) if key in asked else rng.uniform(0.0, 0.6))

    items: list[Item] = []
    if style in (0, 3):  # utterances (vector store, window, archival)
        for n, e in enumerate(ledger.events):
            keys = [f.key for f in extract_facts(e.text)] or [w for w in e.text[:-1].split() if w in hist]
            items.append(Item(n + 1, e.text, score(keys[0] if keys else None), e.time, "event"))
    if style == 1:  # current facts (mem0)
        items += [
            Item(0, f"{k} = {h[-1][2]}", score(k), h[-1][3], "fact", k, h[-1][0], None)
            for k, h in hist.items()
            if h and h[-1][1] is None
        ]
    if style == 2:  # validity intervals (bi-temporal)
        items += [Item(0, f"{k} = {v}", score(k), t, "fact", k, vf, vt) for k, h in hist.items() for vf, vt, v, t in h]
    if not recency:  # a retrieval returns the asked items and a few others, not the whole history
        mine = [it for it in items if it.score >= 0.5]
        rest = [it for it in items if it.score < 0.5]
        items = mine + [rest[int(j)] for j in rng.permutation(len(rest))[:n_other]]
    if (day := asked_day(qs[0].text)) is not None and style in (0, 2) and rng.random() < _TIME_AWARE:
        items = _as_retrieved_at(items, day)
    if style == 3:  # core lines (MemGPT), always first
        items += [
            Item(0, f"{k} = {h[-1][2]}", 2.0, 0.0, "core")
            for k, h in hist.items()
            if h and h[-1][1] is None and (k in asked or rng.random() < 0.3)
        ]
    return _example(render_context(items, budget), [q.text for q in qs], max_tokens)


_WORD = re.compile(r"[a-z]+")


def _as_retrieved_at(items: list[Item], day: float) -> list[Item]:
    """What a time-aware retrieval for "as of `day`" keeps of `items` (`harness.time_filter`): utterances of days
    up to it, facts whose validity interval holds it."""
    return [
        it
        for it in items
        if (
            it.time <= day
            if it.kind == "event"
            else it.valid_from <= day and (it.valid_to is None or day < it.valid_to)
        )
    ]


def _with_namesakes(rng: np.random.Generator, ledger: Ledger) -> Ledger:
    """The same ledger with its variables renamed into families of near-namesakes (about four names a family:
    a fresh name and its `near_names`), as in the context a similarity search over a long history returns."""
    names = {f.key for e in ledger.events for f in extract_facts(e.text)}
    names |= {k for q in ledger.questions for k in asked_names(q.text)}
    names = sorted(names)
    pool: list[str] = []
    for seed_name in _names(rng, len(names)):
        if len(pool) >= len(names):
            break
        if seed_name in pool or seed_name in _NOT_NAMES:
            continue
        pool += [seed_name, *near_names(rng, seed_name, int(rng.integers(2, 5)), avoid=pool)]
    pool = [pool[int(j)] for j in rng.permutation(len(pool))[: len(names)]]
    rename = dict(zip(names, pool))

    def sub(text: str) -> str:
        return _WORD.sub(lambda m: rename.get(m.group(0), m.group(0)), text)

    events = tuple(dataclasses.replace(e, text=sub(e.text)) for e in ledger.events)
    return Ledger(ledger.seed, events, tuple(Question(q.ability, sub(q.text), q.answer) for q in ledger.questions))


def _example(lines: list[str], qs: list[str], max_tokens: int) -> TextExample:
    """The first question as the prompt, its worked answer and the other questions' while they fit `max_tokens`."""
    prompt = format_prompt(qs[0], lines)
    completion = f" {worked_answer(qs[0], lines)}\n"
    for q in qs[1:]:
        more = f"Q: {q}\nA: {worked_answer(q, lines)}\n"
        if max_tokens and 2 + len(TEXT_TOKENIZER.encode(prompt + completion + more)) > max_tokens:
            break
        completion += more
    return TextExample(prompt, completion)


# The drills' mix (`_drill`), the curriculum's lookup stage (one value per variable: match the name)
# and the days the drills' histories span, one of these at random in the mix: a 1000-event ledger's are 0-125,
# a 3000-event ledger's 0-375 (a reader that never saw a day past 150 copies "day 203" as "day 20").
PLAIN_DRILLS = {"now": 0.35, "sum": 0.2, "at": 0.25, "absent": 0.2}
LOOKUP_DRILLS = {"now": 0.85, "absent": 0.15}
_DRILL_DAYS = (150, 500)
_DRILL_ASIDES = 0.3  # P(a variable's utterances in a drill add "remember to check" or "is still")
_TIME_AWARE = 0.5  # P(an "as of" context is what a time-aware retrieval returns: lines up to the day, or facts
# valid on it; `harness.time_filter`), in drills and store-shaped examples
_DRILL_VARS = (0.1, 0.2, 0.25, 0.25, 0.2)  # P(1..5 variables in a drill): the asked one among distractors


def _drill(
    rng, hist, live, style, budget, questions, max_tokens, max_vars=3, drills=PLAIN_DRILLS, hard=False
) -> TextExample:
    """A short drill in a store's line style: one to five variables, each with a history of one to three values
    (or a drop), and questions of every ledger form about them; the budget keeps the first question's lines.

    The four drills (`drills`: name -> probability) are the store-shaped questions' steps in isolation: "now" (the
    current value: copy the only value, match the name among several, take the latest of a variable's lines),
    "sum" (two variables' current values and their sum), "at" (the value on an earlier day: the last line on or
    before it, which can be any of the variable's lines, its last one too) and "absent" (a variable of the ledger
    not in the lines, or dropped: "unknown"). In utterances, a variable's lines may add one that sets nothing new
    ("remember to check kobu.", "kobu is still 40.", as the ledger's do). An "as of" drill's lines are, in a
    share `_TIME_AWARE`, only those a time-aware retrieval keeps (`_as_retrieved_at`). Stores that keep
    only current values (the fact store, core lines) show one line per variable. With `drills` of "now" and
    "absent" only (`LOOKUP_DRILLS`, the curriculum's second stage) every variable has one value, 1 to `max_vars`
    of them; one variable with one value (`max_vars` = 1, the first stage) is answered by copying the only value.
    `hard`: the variables are near-namesakes of the first (`near_names`), and an absent one is asked by a
    near-namesake of one shown ("unknown" though a similar name has a value).
    """
    lookups = set(drills) <= {"now", "absent"}  # the curriculum's lookup stage: one value per variable
    if max_vars == 1:
        n, kind = 1, "now"
    else:
        kind = str(rng.choice(list(drills), p=np.asarray(list(drills.values())) / sum(drills.values())))
        if not lookups:  # the drills: as many variables as a store's context shows
            n = 1 + int(rng.choice(len(_DRILL_VARS), p=_DRILL_VARS))
        elif max_vars == 3:
            n = 1 + int(rng.choice(3, p=[0.4, 0.35, 0.25]))
        else:
            n = 1 + int(rng.integers(max_vars))
        if kind == "sum":
            n = max(n, 2)
    if kind == "at" and style not in (0, 2):
        style = int(rng.choice([0, 2]))  # only utterances and validity intervals tell an earlier day's value
    keys = [live[int(j)] for j in rng.permutation(len(live))[:n]]
    if len(keys) < n:  # a ledger with fewer live variables: fresh names
        keys += [k for k in _names(rng, n + len(hist)) if k not in hist][: n - len(keys)]
    if hard:
        keys = keys[:1] + near_names(rng, keys[0], n - 1, avoid=hist)
    histories = {}  # key -> [(day, value or None for a drop)], days increasing
    span = _DRILL_DAYS[0] if lookups else int(rng.choice(_DRILL_DAYS))  # no draw in the lookup stages
    for j, k in enumerate(keys):
        m = 1 if max_vars == 1 or lookups else 1 + int(rng.choice(3, p=[0.45, 0.35, 0.2]))
        if kind == "at" and j == 0:
            m = max(m, 2)
        days = np.sort(rng.choice(span, size=m, replace=False))
        h = [(int(d), int(rng.integers(100))) for d in days]
        if max_vars > 1 and kind != "at" and m > 1 and rng.random() < 0.1:
            h[-1] = (h[-1][0], None)  # dropped
        histories[k] = h
    asides = []  # (day, key, line): the ledger's lines that name a variable and set nothing new
    if style == 0 and not lookups:
        for k, h in histories.items():
            if rng.random() >= _DRILL_ASIDES:
                continue
            i = int(rng.integers(len(h)))
            (d, v), nxt = h[i], h[i + 1][0] if i + 1 < len(h) else h[i][0] + 20
            if v is not None and nxt > d + 1:
                line = f"{k} is still {v}." if rng.random() < 0.4 else f"remember to check {k}."
                asides.append((int(rng.integers(d + 1, nxt)), k, line))
    if hard:
        absent = near_names(rng, keys[int(rng.integers(n))], 2, avoid={*hist, *keys})
    else:
        absent = [k for k in hist if k not in histories]

    def ask(kind):
        if kind == "sum" and len(keys) > 1:
            a, b = (keys[int(j)] for j in rng.permutation(len(keys))[:2])
            return f"what is {a} plus {b} now?"
        if kind == "at":
            k = keys[0] if len(histories[keys[0]]) > 1 else keys[int(rng.integers(len(keys)))]
            h = histories[k]
            # Any line's value can be the answer, the last one too (a day past it, as when a retrieval or the
            # budget leaves out later lines): each line holds for its gap, the last for the mean gap.
            hi = h[-1][0] + max(1, (h[-1][0] - h[0][0]) // (len(h) - 1)) if len(h) > 1 else h[0][0] + 10
            return f"what was {k} on day {int(rng.integers(h[0][0], hi))}?"
        if kind == "absent" and absent:
            return f"what is {absent[int(rng.integers(len(absent)))]} now?"
        return f"what is {keys[int(rng.integers(len(keys)))]} now?"

    first = ask(kind)
    asked = set(asked_names(first))
    until = np.inf if (day := asked_day(first)) is None else day
    narrow = kind == "at" and rng.random() < _TIME_AWARE  # no draw for the other forms: their stream is unchanged

    def rank(k, d) -> float:
        """The first question's lines first, so the budget cuts the others; asked as of a day, its lines on or
        before the day first (as `harness.gold_context` ranks them)."""
        return (1.0 if d <= until else 0.75) if k in asked else 0.5

    items = []
    for k, h in histories.items():
        score = 1.0 if k in asked else 0.5
        if style == 0:
            for i, (d, v) in enumerate(h):
                text = f"drop {k}." if v is None else (f"set {k} to {v}." if i == 0 else f"change {k} to {v}.")
                items.append(Item(len(items) + 1, text, rank(k, d), float(d), "event"))
            for d, key, text in asides:
                if key == k:
                    items.append(Item(len(items) + 1, text, rank(k, d), float(d), "event"))
        elif style == 2:
            for i, (d, v) in enumerate(h):
                if v is not None:
                    end = None if i + 1 == len(h) else float(h[i + 1][0])
                    items.append(Item(len(items) + 1, f"{k} = {v}", rank(k, d), float(d), "fact", k, float(d), end))
        elif h[-1][1] is not None:  # current values only
            d, v = h[-1]
            if style == 3:
                items.append(Item(0, f"{k} = {v}", 2.0, 0.0, "core"))
            else:
                items.append(Item(len(items) + 1, f"{k} = {v}", score, float(d), "fact", k, float(d), None))
    if narrow:
        items = _as_retrieved_at(items, until)
    more = {k: w for k, w in drills.items() if k != "at" or style in (0, 2)}  # core lines have no days
    p = np.asarray(list(more.values())) / sum(more.values())
    qs = [first] + [ask(str(rng.choice(list(more), p=p))) for _ in range(int(questions) - 1)]
    return _example(render_context(items, budget), qs, max_tokens)


def _example_at(stream_seed: int, index: int, *, curriculum: tuple[int, int] = (0, 0), **kw) -> TextExample:
    if index < curriculum[1]:  # the early stream: lookups only, one variable alone at first, names far apart
        kw.update(easy=1.0, max_vars=1 if index < curriculum[0] else kw.get("max_vars", 3), drills=LOOKUP_DRILLS)
        kw.update(near=0.0)
    return reading_example(int(np.random.SeedSequence([stream_seed, index]).generate_state(1)[0]), **kw)


def reading_source(
    budget: int = 128,
    events: tuple[int, int] = (6, 64),
    questions: int = 3,
    easy: float = 0.5,
    curriculum: tuple[int, int] = (0, 0),
    max_vars: int = 3,
    near: float = 0.0,
) -> TextSource:
    """The answerer's training stream (see `reading_example`); `budget` bounds the context's tokens.

    `curriculum=(a, b)`: examples before index a are one-variable lookups (copy the only value), before index b
    lookups among one to `max_vars` variables with one value each (`LOOKUP_DRILLS`: match the name), then the mix
    (drills of every form, `PLAIN_DRILLS`, and store-shaped contexts). `curriculum_indices` converts steps.
    `near`: the share of examples among near-namesakes (`reading_example`) in the mix; the lookup stages keep
    names apart (near-namesakes there slow the name match from forming: docs/results/memory.md).
    """
    if int(budget) <= 0 or not 1 <= events[0] <= events[1] or int(questions) < 1 or not 0.0 <= easy <= 1.0:
        raise ValueError(
            f"budget = {budget}, events = {events}, questions = {questions}, easy = {easy}; "
            "expected budget > 0, 1 <= lo <= hi, questions >= 1 and 0 <= easy <= 1"
        )
    if not 0 <= curriculum[0] <= curriculum[1]:
        raise ValueError(f"curriculum = {curriculum}; expected 0 <= a <= b (example indices)")
    if isinstance(max_vars, bool) or int(max_vars) < 1:
        raise ValueError(f"max_vars = {max_vars!r}; expected >= 1 (variables in a plain lookup)")
    if not 0.0 <= near <= 1.0:
        raise ValueError(f"near = {near!r}; expected a share in [0, 1] (examples among near-namesakes)")
    longest_q = len("Q: what is abababab plus abababab now?\nA:")
    longest_a = ANSWER_TOKENS
    max_tokens = 1 + int(budget) + longest_q + longest_a + 1
    return TextSource(
        functools.partial(
            _example_at,
            budget=int(budget),
            events=tuple(events),
            questions=int(questions),
            easy=float(easy),
            max_tokens=max_tokens,
            curriculum=(int(curriculum[0]), int(curriculum[1])),
            max_vars=int(max_vars),
            near=float(near),
        ),
        name="ledger_reading",
        min_tokens=MIN_TOKENS,
        max_tokens=max_tokens,
        hint=" (the answerer needs seq_len >= budget + 112)",
    )


MIN_TOKENS = 16


def curriculum_indices(steps: tuple[int, int], batch_size: int, seq_len: int, pack: bool) -> tuple[int, int]:
    """The example indices where the curriculum's stages end, from training steps: a packed row of `seq_len`
    tokens starts every `seq_len // MIN_TOKENS` indices of the stream (`data.make_text_dataset`), a plain row
    every index."""
    per_row = max(1, seq_len // MIN_TOKENS) if pack else 1
    return (int(steps[0]) * batch_size * per_row, int(steps[1]) * batch_size * per_row)
