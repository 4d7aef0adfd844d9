"""The LM answerer: a Lumen LM (text tokenizer) that reads a store's retrieved lines and answers, or abstains.

Glossary: B batch, S prompt + generated tokens, T tokens, V vocab, N new tokens.

The dialogue format of one question (prompt, then the completion the model learns; the pipeline adds BOS/EOS):

    core: lima = 7                  <- the retrieved context, filled by rank and shown in time order
    day 3: set kobu to 12.             (`harness.render_context`)
    day 5-now: kobu = 40
    Q: what is kobu now?            <- the question right before the answer
    A:                              <- prompt ends here
     kobu = 40                      <- completion: " <worked answer>\n" (`worked_answer`; the answer is its last
                                       field, a number or "unknown")

Training data (`reading_source`): ledgers from `harness.make_ledger` with contexts shaped like each store's
(utterances as a vector store, window or full context returns them, current facts as the fact store, validity
intervals as the temporal store, core lines plus utterances as MemGPT), built without a database so a batch is
cheap; the target is what the context supports (`harness.rule_reader`), so the model learns to read, not to
guess: when the asked variable is absent the target is "unknown". A training example may ask up to three
questions of one context ("Q: ...\nA: ...\n" after the first answer): more lookups per token read. A share of
short drills of every question form (`_drill`: current values among updates, sums, "as of" days, absent
variables) and a curriculum over the stream (one-variable lookups first, then lookups among variables with one
value each, then the mix) give the model the copy, then the name match, before the rest. It trains through the
one loop as a `loop.Task` (`experiments.memory.make_task`).

`LMReader(params, cfg, decision=...)` is a harness reader: `reader(question, lines)` or
`reader.answer_batch(pairs)` (one `generate` call per batch, stopping at EOS or the newline), greedy or by the
scored rule (an "unknown" replaced by a likelier number answer; see `LMReader`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

from framework.memory.base import Item
from framework.memory.harness import (
    _CONSONANTS,
    _Q_AT,
    _Q_NOW,
    _Q_SUM,
    _VOWELS,
    UNKNOWN,
    Ledger,
    Question,
    _lookup,
    _names,
    asked_names,
    make_ledger,
    render_context,
)
from framework.memory.ledger import extract_facts
from framework.tasks.data import TextExample, TextSource
from framework.tasks.tokenizer import TEXT_TOKENIZER

__all__ = [
    "DECISIONS",
    "LMReader",
    "NoUnknown",
    "answer_mask",
    "column_sum",
    "final_answer",
    "format_prompt",
    "lookup_probe",
    "lookup_probe_examples",
    "near_names",
    "reading_example",
    "reading_source",
    "worked_answer",
]


def format_prompt(question: str, lines: Sequence[str]) -> str:
    """The answerer's prompt: the context lines, then "Q: <question>" and "A:".

    The question comes right before the answer so that the lookup is short: at "A:" the asked name is a few tokens
    back and the model copies the value that follows that name in the context (an induction-style match).
    """
    return "".join(line + "\n" for line in lines) + f"Q: {question}\nA:"


def worked_answer(question: str, lines: Sequence[str]) -> str:
    """What the answerer writes after "A:": the asked names restated with the values the lines give, then the answer.

    "kobu = 40", "kobu on day 4 = 12", "kobu + lima = 48 + 7: 8+7=15, 4+0+1=5 = 55" ("unknown" for a value the
    lines lack; a sum with an unknown term is unknown; a sum is added in columns, `column_sum`). Restating the
    name first turns the lookup into a copy: having written "kobu = ", the model finds "kobu" in the context and
    copies what follows it (an induction-style match), instead of carrying the name from the question to the
    answer in one step. The answer is the last field
    (`final_answer`), always what `harness.rule_reader` reads from the same lines.
    """
    if m := _Q_SUM.match(question):
        a, b = (_lookup(lines, m.group(i), None) for i in (1, 2))
        head = f"{m.group(1)} + {m.group(2)} = {_show(a)} + {_show(b)}"
        return f"{head} = {UNKNOWN}" if a is None or b is None else f"{head}: {column_sum(a, b)} = {a + b}"
    if m := _Q_NOW.match(question):
        return f"{m.group(1)} = {_show(_lookup(lines, m.group(1), None))}"
    if m := _Q_AT.match(question):
        return f"{m.group(1)} on day {m.group(2)} = {_show(_lookup(lines, m.group(1), float(m.group(2))))}"
    raise ValueError(f"question = {question!r}; expected one of the ledger question forms")


def column_sum(a: int, b: int) -> str:
    """Written addition, units first: "8+6=14, 5+2+1=8" for 58 + 26 (each column's digits plus the carry, 0 or 1).

    Each step is a one-digit sum of digits the model copies from fixed places (the numbers' last digits, the
    previous column's carry); the total is then the last column's sum followed by the other columns' units.
    """
    if a < 0 or b < 0:
        raise ValueError(f"column_sum({a}, {b}): expected non-negative ledger values")
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = (int(d[i]) if i < len(d) else 0 for d in (xs, ys))
        total = x + y + carry
        steps.append(f"{x}+{y}={total}" if i == 0 else f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return ", ".join(steps)


def _show(v: int | None) -> str:
    return UNKNOWN if v is None else str(v)


def final_answer(text: str) -> str:
    """The answer in a worked answer: the field after its last "= " (the whole text if it has none)."""
    return text.strip().rsplit("= ", 1)[-1].strip()


def answer_mask(
    tokens_BT: np.ndarray, segment_ids_BT: np.ndarray | None = None, tokenizer=TEXT_TOKENIZER
) -> np.ndarray:
    """[B, T] float32: 1 on every answer's tokens (after each "A:" up to its newline, and an EOS right after), else 0.

    Training reads the whole dialogue with a weight on the rest (`experiments.memory`: `task.context_weight`) and
    the full weight on the answers; this finds them in packed rows without the prompt lengths, since each answer
    follows an "A:" and ends at the next newline. A training example may ask several questions of one context.
    """
    tokens_BT = np.asarray(tokens_BT)
    seg_BT = np.ones_like(tokens_BT) if segment_ids_BT is None else np.asarray(segment_ids_BT)
    a, colon = (int(t) for t in tokenizer.encode("A:"))
    newline = int(tokenizer.encode("\n")[0])
    out_BT = np.zeros(tokens_BT.shape, np.float32)
    for b, row in enumerate(tokens_BT):
        starts = np.flatnonzero((row[:-2] == a) & (row[1:-1] == colon)) + 2  # the token right after "A:"
        ends = np.flatnonzero(row == newline)
        for s in starts:
            j = np.searchsorted(ends, s)
            e = int(ends[j]) + 1 if j < len(ends) else len(row)
            if e < len(row) and row[e] == tokenizer.eos_id and seg_BT[b, e] == seg_BT[b, s]:
                e += 1
            out_BT[b, s:e] = seg_BT[b, s:e] == seg_BT[b, s]
    return out_BT * ((seg_BT > 0) & (tokens_BT != tokenizer.pad_id))


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
    in one example of eight), cut to `budget` tokens and shown oldest first. Every answer is what the context
    supports (`rule_reader`); values are uniform, so the lookup is the only way to predict a number. The first
    question is the one the context was retrieved for; the others (asked while the example fits `max_tokens`)
    read the same lines, adding answer targets at little cost. A fraction `easy` of the examples are plain
    drills (`_drill`, of the forms in `drills`): the steps the store-shaped questions build on. A fraction `near`
    of the examples (drills and store-shaped) name their variables by near-namesakes (`near_names`): what a
    similarity search over a long history puts beside the asked name, so the name must match in full.
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
    if style == 3:  # core lines (MemGPT), always first
        items += [
            Item(0, f"{k} = {h[-1][2]}", 2.0, 0.0, "core")
            for k, h in hist.items()
            if h and h[-1][1] is None and (k in asked or rng.random() < 0.3)
        ]
    return _example(render_context(items, budget), [q.text for q in qs], max_tokens)


_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)
_NOT_NAMES = frozenset({"fine"})  # a word of the ledger's chit-chat with a name's shape


def near_names(rng: np.random.Generator, name: str, n: int, avoid=()) -> list[str]:
    """`n` distinct names that share most of `name`'s character trigrams: the distractors a similarity search over
    a long history ranks beside it ("zabo" beside "dabo", "risepa" beside "depa").

    Each is `name` with one edit to its syllables (consonant-vowel pairs, two to four of them): a new first or
    middle syllable or one changed letter (the end kept, which a lookup matching only the last characters
    confuses), a syllable added in front or the first dropped (one name the other's suffix), or a new last
    syllable (the start kept). Names in `avoid` are never returned.
    """
    syl = [name[i : i + 2] for i in range(0, len(name), 2)]
    if len(name) % 2 or not all(len(s) == 2 and s[0] in _CONSONANTS and s[1] in _VOWELS for s in syl):
        raise ValueError(f"name = {name!r}; expected consonant-vowel syllables (a ledger name)")
    seen, out = set(avoid) | {name} | _NOT_NAMES, []
    for _ in range(100 * int(n)):
        if len(out) == n:
            break
        s, r = list(syl), rng.random()
        if r < 0.35 and len(s) > 1:  # a new syllable before the last: the ending kept
            s[int(rng.integers(len(s) - 1))] = _SYLLABLES[int(rng.integers(len(_SYLLABLES)))]
        elif r < 0.55 and len(s) < 4:  # a syllable in front: the whole name is the other's ending
            s.insert(0, _SYLLABLES[int(rng.integers(len(_SYLLABLES)))])
        elif r < 0.65 and len(s) > 2:
            s = s[1:]
        elif r < 0.8:  # a new last syllable: the start kept
            s[-1] = _SYLLABLES[int(rng.integers(len(_SYLLABLES)))]
        else:  # one letter changed: a consonant for a consonant or a vowel for a vowel
            j = int(rng.integers(len(s)))
            c, v = s[j]
            if rng.random() < 0.5:
                s[j] = c + _VOWELS[int(rng.integers(len(_VOWELS)))]
            else:
                s[j] = _CONSONANTS[int(rng.integers(len(_CONSONANTS)))] + v
        cand = "".join(s)
        if cand not in seen:
            seen.add(cand)
            out.append(cand)
    return out


_WORD = re.compile(r"[a-z]+")


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
# and the days the drills' histories span (a 1000-event ledger's are 0-125).
PLAIN_DRILLS = {"now": 0.5, "sum": 0.2, "at": 0.2, "absent": 0.1}
LOOKUP_DRILLS = {"now": 0.85, "absent": 0.15}
_DRILL_DAYS = 150
_DRILL_VARS = (0.1, 0.2, 0.25, 0.25, 0.2)  # P(1..5 variables in a drill): the asked one among distractors


def _drill(
    rng, hist, live, style, budget, questions, max_tokens, max_vars=3, drills=PLAIN_DRILLS, hard=False
) -> TextExample:
    """A short drill in a store's line style: one to five variables, each with a history of one to three values
    (or a drop), and questions of every ledger form about them; the budget keeps the first question's lines.

    The four drills (`drills`: name -> probability) are the store-shaped questions' steps in isolation: "now" (the
    current value: copy the only value, match the name among several, take the latest of a variable's lines),
    "sum" (two variables' current values and their sum), "at" (the value on an earlier day: the last line on or
    before it) and "absent" (a variable of the ledger not in the lines, or dropped: "unknown"). Stores that keep
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
    for j, k in enumerate(keys):
        m = 1 if max_vars == 1 or lookups else 1 + int(rng.choice(3, p=[0.45, 0.35, 0.2]))
        if kind == "at" and j == 0:
            m = max(m, 2)
        days = np.sort(rng.choice(_DRILL_DAYS, size=m, replace=False))
        h = [(int(d), int(rng.integers(100))) for d in days]
        if max_vars > 1 and kind != "at" and m > 1 and rng.random() < 0.1:
            h[-1] = (h[-1][0], None)  # dropped
        histories[k] = h
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
            hi = h[-1][0] if len(h) > 1 else h[0][0] + 10
            return f"what was {k} on day {int(rng.integers(h[0][0], hi))}?"
        if kind == "absent" and absent:
            return f"what is {absent[int(rng.integers(len(absent)))]} now?"
        return f"what is {keys[int(rng.integers(len(keys)))]} now?"

    first = ask(kind)
    asked = set(asked_names(first))

    items = []
    for k, h in histories.items():
        score = 1.0 if k in asked else 0.5  # the first question's lines ranked first: the budget cuts the others
        if style == 0:
            for i, (d, v) in enumerate(h):
                text = f"drop {k}." if v is None else (f"set {k} to {v}." if i == 0 else f"change {k} to {v}.")
                items.append(Item(len(items) + 1, text, score, float(d), "event"))
        elif style == 2:
            for i, (d, v) in enumerate(h):
                if v is not None:
                    end = None if i + 1 == len(h) else float(h[i + 1][0])
                    items.append(Item(len(items) + 1, f"{k} = {v}", score, float(d), "fact", k, float(d), end))
        elif h[-1][1] is not None:  # current values only
            d, v = h[-1]
            if style == 3:
                items.append(Item(0, f"{k} = {v}", 2.0, 0.0, "core"))
            else:
                items.append(Item(len(items) + 1, f"{k} = {v}", score, float(d), "fact", k, float(d), None))
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
# The longest worked answer (a sum of two 8-letter names' two-digit values) with its leading space and newline, in
# tokens of the text tokenizer (one per character).
ANSWER_TOKENS = len(f" abababab + abababab = 99 + 99: {column_sum(99, 99)} = 198\n")


def curriculum_indices(steps: tuple[int, int], batch_size: int, seq_len: int, pack: bool) -> tuple[int, int]:
    """The example indices where the curriculum's stages end, from training steps: a packed row of `seq_len`
    tokens starts every `seq_len // MIN_TOKENS` indices of the stream (`data.make_text_dataset`), a plain row
    every index."""
    per_row = max(1, seq_len // MIN_TOKENS) if pack else 1
    return (int(steps[0]) * batch_size * per_row, int(steps[1]) * batch_size * per_row)


def lookup_probe_examples(
    lines_per_context: Sequence[int] = (1, 2, 3), count: int = 64, seed: int = 123, tokenizer=TEXT_TOKENIZER
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Held-out plain lookups that show whether the answerer matches names: {"n2_event": (tokens_BT, at_B, gold_B)}.

    For each number of lines n and each line style (utterances "day d: set kobu to 12." or fact lines
    "day d-now: kobu = 12"), `count` contexts of n variables with fresh names and uniform values, one asked; the
    tokens run up to the worked answer's "kobu =", `at_B` is the last position and `gold_B` the first token of the
    value. A reader that copies a value without matching the name scores ~1/n of its one-line score. The "near"
    sets (n >= 2: "n3_near") are fact lines of near-namesakes (`near_names`, "dabo", "zabo", "kazabo"): a reader
    that matches only a name's last characters falls on them.
    """
    out = {}
    for n in lines_per_context:
        for style in ("event", "fact", "near")[: 3 if n > 1 else 2]:
            rng = np.random.default_rng([seed, n, ("event", "fact", "near").index(style)])
            rows, at, gold = [], [], []
            for _ in range(count):
                names = _names(rng, n)
                if style == "near":
                    names = names[:1] + near_names(rng, names[0], n - 1)
                    names = [names[int(j)] for j in rng.permutation(n)]
                items = []
                for j, k in enumerate(names):
                    v, t = int(rng.integers(100)), float(rng.integers(0, 9))
                    items.append(
                        Item(j + 1, f"set {k} to {v}.", 1.0, t, "event")
                        if style == "event"
                        else Item(j + 1, f"{k} = {v}", 1.0, t, "fact", k, t, None)
                    )
                lines = render_context(items, None)
                q = f"what is {names[int(rng.integers(n))]} now?"
                head, value = worked_answer(q, lines).rsplit("= ", 1)
                prefix = [tokenizer.bos_id, *tokenizer.encode(f"{format_prompt(q, lines)} {head}=")]
                full = [tokenizer.bos_id, *tokenizer.encode(f"{format_prompt(q, lines)} {head}= {value}")]
                if full[: len(prefix)] != prefix:
                    raise ValueError(f"{tokenizer.name!r} merges across the '=' of a worked answer: cannot probe")
                while not tokenizer.decode(full[len(prefix) : len(prefix) + 1]).strip():
                    prefix = full[: len(prefix) + 1]  # a space token of its own (characters) belongs to the prompt
                rows.append(prefix)
                at.append(len(prefix) - 1)
                gold.append(full[len(prefix)])
            out[f"n{n}_{style}"] = (rows, np.asarray(at, np.int32), np.asarray(gold, np.int32))
    width = max(len(r) for rows, _, _ in out.values() for r in rows)  # one shape for every set: one compile
    for key, (rows, at, gold) in out.items():
        tokens_BT = np.zeros((count, width), np.int32)
        for b, r in enumerate(rows):
            tokens_BT[b, : len(r)] = r
        out[key] = (tokens_BT, at, gold)
    return out


def lookup_probe(cfg, examples=None):
    """`probe(params) -> {"lookup_p_n2_event": mean probability of the correct first value token, ...}`.

    Teacher-forced on `lookup_probe_examples`: the probability the model gives the asked variable's value right
    after "kobu =", with 1, 2, 3 lines in the context. Name matching shows as the n-line score staying near the
    one-line score; copying some value without matching falls as ~1/n of it.
    """
    import jax
    import jax.numpy as jnp

    from framework.models import lm

    cfg = lm.LMConfig.from_config(cfg)
    examples = lookup_probe_examples() if examples is None else examples

    @jax.jit
    def prob(params, tokens_BT, at_B, gold_B):
        logits_BNV = lm.forward(params, tokens_BT, cfg, logits_at=at_B[:, None]).logits
        return jnp.take_along_axis(jax.nn.softmax(logits_BNV[:, 0].astype(jnp.float32)), gold_B[:, None], 1).mean()

    def probe(params) -> dict[str, float]:
        return {f"lookup_p_{k}": float(prob(params, *map(jnp.asarray, v))) for k, v in examples.items()}

    return probe


@dataclasses.dataclass(frozen=True)
class NoUnknown:
    """A logits processor that forbids starting "unknown" in a value slot (right after "= "), so the continuation
    must give a number wherever a value goes."""

    equals: int
    space: int
    u: int

    def __call__(self, logits_BV, tokens_BS, lengths_B):
        import jax.numpy as jnp

        last2_B2 = jnp.take_along_axis(tokens_BS, jnp.maximum(lengths_B[:, None] + jnp.arange(-2, 0), 0), axis=1)
        slot_B = (last2_B2[:, 0] == self.equals) & (last2_B2[:, 1] == self.space)
        return logits_BV.at[:, self.u].set(jnp.where(slot_B, -jnp.inf, logits_BV[:, self.u]))


DECISIONS = ("greedy", "scored")


class LMReader:
    """A harness reader backed by a Lumen LM: answers to (question, context lines) by one of two decoding rules.

    The model writes a worked answer ("kobu = 40", `worked_answer`); the reader returns its last field.
    `decision="greedy"`: the greedy continuation of the prompt up to its newline.
    `decision="scored"`: the greedy continuation, except that where it answers "unknown", the greedy continuation
    with "unknown" forbidden in every value slot (`NoUnknown`) is taken instead if its sequence log-probability
    under the model (raw logits, no processor) is higher. Greedy decides token by token and can pick "unknown"
    when most of the mass is on "some number" but spread over ten first digits; this rule compares whole answers.
    """

    def __init__(
        self,
        params,
        cfg,
        *,
        max_new_tokens: int = ANSWER_TOKENS,
        batch_size: int = 32,
        decision: str = "greedy",
        tokenizer=TEXT_TOKENIZER,
    ):
        from framework.models import lm

        self.params, self.cfg = params, lm.LMConfig.from_config(cfg)
        if self.cfg.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"model vocab_size {self.cfg.vocab_size} != the {tokenizer.name!r} tokenizer's "
                f"{tokenizer.vocab_size}: the answerer reads the text tokenizer"
            )
        if decision not in DECISIONS:
            raise ValueError(f"decision = {decision!r}; expected one of {DECISIONS}")
        self.tokenizer, self.max_new_tokens, self.batch_size = tokenizer, int(max_new_tokens), int(batch_size)
        self.decision = decision
        self.newline = int(tokenizer.encode("\n")[0])
        self.no_unknown = NoUnknown(*(int(t) for t in tokenizer.encode("= u")))

    def _generate(self, chunk: list[np.ndarray], processors: tuple) -> tuple[list[str], np.ndarray]:
        """Greedy worked answers (text up to the newline) and their sequence log-probabilities under the model."""
        from framework.inference import generate

        res = generate(
            self.params,
            self.cfg,
            chunk,
            max_new_tokens=self.max_new_tokens,
            stop_tokens=(self.tokenizer.eos_id, self.newline),
            logits_processors=processors,
        )
        toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
        texts = [self.tokenizer.decode(toks[b, : lens[b]]) for b in range(len(chunk))]
        return texts, np.asarray(res.logprobs).sum(axis=1)  # zero past each row's length

    def worked_batch(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """The worked answers ("kobu = 40") to [(question, lines)], in order, by `self.decision`."""
        prompts = [
            np.concatenate([[self.tokenizer.bos_id], self.tokenizer.encode(format_prompt(q, lines))])
            for q, lines in pairs
        ]
        for p in prompts:
            if len(p) + self.max_new_tokens > self.cfg.max_seq_len:
                raise ValueError(
                    f"a prompt of {len(p)} tokens + {self.max_new_tokens} new exceeds the answerer's "
                    f"max_seq_len {self.cfg.max_seq_len}: lower the harness budget"
                )
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            chunk = prompts[lo : lo + self.batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch_size - n)  # one batch shape: one compile per prompt bucket
            texts, logp_B = self._generate(chunk, ())
            if self.decision == "scored" and any(final_answer(t) == UNKNOWN for t in texts[:n]):
                forced, forced_logp_B = self._generate(chunk, (self.no_unknown,))
                texts = [
                    f if final_answer(t) == UNKNOWN and forced_logp_B[b] > logp_B[b] else t
                    for b, (t, f) in enumerate(zip(texts, forced))
                ]
            out += [t.strip() for t in texts[:n]]
        return out

    def answer_batch(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """Answers to [(question, lines)], in order: the last field of each worked answer."""
        return [final_answer(t) for t in self.worked_batch(pairs)]

    def __call__(self, question: str, lines: Sequence[str]) -> str:
        """The answer to one question."""
        return self.answer_batch([(question, lines)])[0]
