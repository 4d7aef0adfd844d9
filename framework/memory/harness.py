"""LongMemEval-style ledger dialogues with exact answers, a rule-based reader, and the evaluation loop over stores.

Glossary: E events in a history, Q questions, k items retrieved per question.

A ledger (`make_ledger(seed, n_events)`) is a multi-session dialogue (one session per day, `per_session`
utterances each) in which named variables are set, changed, restated and dropped (`ledger` grammar), mixed with
chit-chat and distractors that name a variable without a value. The same (seed, n_events) always gives the same
ledger. After the history, questions probe LongMemEval's five abilities, each with one exact answer:

  extraction     "what is kobu now?"          a variable set once in one session, never touched again
  multi_session  "what is kobu plus lima now?" two live variables last set in different sessions: their sum
  temporal       "what was kobu on day 4?"    the value at the end of an earlier day (it has changed since)
  update         "what is kobu now?"          a variable changed at least once: its latest value
  abstention     "what is zuvo now?"          never set, or dropped: the answer is "unknown"

Readers turn (question, retrieved context) into an answer string:
- `rule_reader` is deterministic and exact about the formats it reads: it replays "day d: <utterance>" lines,
  reads "day a-b: key = value" fact lines and "core: key = value" lines. It is the baseline that isolates the
  store: a wrong answer means the store did not put the needed lines in the context.
- The Lumen LM answerer (`framework.memory.answerer`) reads the same context text.

`ask(store, ledger, time_aware=True)` narrows an "as of day d" question's retrieval to that time where the store
can (`time_filter`: a bi-temporal store's facts valid at d, an utterance store's lines of days up to d), as
LongMemEval's time-aware query expansion narrows the search to the time a question names.

`evaluate(store, ledger, reader, k=..., budget=...)` writes the history into the store, asks every question with
`store.retrieve(question, k)`, renders the items oldest first (core lines first) and keeps the most recent lines
that fit in `budget` tokens of the text tokenizer (the reader's window; a full history longer than it is cut, which
is how full context degrades), then scores exact matches. Tokens read per question = context + question tokens.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from framework.memory.base import Event, Item
from framework.memory.ledger import extract_facts
from framework.tasks.tokenizer import TEXT_TOKENIZER

__all__ = [
    "ABILITIES",
    "Ledger",
    "Question",
    "ask",
    "asked_day",
    "asked_names",
    "evaluate",
    "gold_context",
    "make_ledger",
    "near_names",
    "render_context",
    "rule_reader",
    "score",
    "time_filter",
]

ABILITIES = ("extraction", "multi_session", "temporal", "update", "abstention")
UNKNOWN = "unknown"
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_CHATTER = ("the sky looks {adj} today.", "my {noun} feels {adj}.", "lunch was {adj}.", "the {noun} is {adj} again.")
_ADJ = ("grey", "calm", "loud", "warm", "odd", "bright", "slow", "fine")
_NOUN = ("garden", "train", "office", "coffee", "river", "meeting", "window", "printer")


@dataclasses.dataclass(frozen=True)
class Question:
    """One question about the end of a history: its ability, text and the one exact answer."""

    ability: str
    text: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Ledger:
    """A generated history (events in order) and its questions."""

    seed: int
    events: tuple[Event, ...]
    questions: tuple[Question, ...]


def _names(rng: np.random.Generator, n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        syl = int(rng.integers(2, 4))
        name = "".join(
            _CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syl)
        )
        if name not in seen and name not in _NOT_NAMES:  # "fine" is a word of the chit-chat too
            seen.add(name)
            out.append(name)
    return out


_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)
_NOT_NAMES = frozenset({"fine"})  # a word of the ledger's chit-chat with a name's shape


def near_names(rng: np.random.Generator, name: str, n: int, avoid=()) -> list[str]:
    """`n` distinct names that share most of `name`'s character trigrams: the distractors a similarity search over
    a long history ranks beside it ("zabo" beside "dabo", "risepa" beside "depa").

    Each is `name` with one edit to its syllables (consonant-vowel pairs, two to four of them): a new first or
    middle syllable or one changed letter (the end kept, which a lookup matching only the last characters
    confuses), a syllable added in front or the first dropped (one name the other's suffix), or a new last
    syllable (the start kept). Names in `avoid` are never returned (fewer than `n` only when it leaves too few).
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


def make_ledger(seed: int, n_events: int, *, per_session: int = 8, questions_per_ability: int = 4) -> Ledger:
    """A deterministic ledger dialogue of `n_events` utterances and up to `questions_per_ability` per ability."""
    if isinstance(n_events, bool) or int(n_events) <= 0:
        raise ValueError(f"n_events = {n_events!r}; expected a positive number of utterances")
    if int(per_session) <= 0 or int(questions_per_ability) <= 0:
        raise ValueError(f"per_session = {per_session}, questions_per_ability = {questions_per_ability}; expected > 0")
    rng = np.random.default_rng([int(seed), int(n_events)])
    pool = _names(rng, int(n_events) + 4 * int(questions_per_ability) + 8)
    fresh = iter(pool)
    live: dict[str, int] = {}
    hist: dict[str, list[tuple[int, str, int | None]]] = {}  # name -> [(day, op, value)]
    events = []
    for i in range(int(n_events)):
        day = i // int(per_session)
        r = rng.random()
        if not live or r < 0.3:
            name, v = next(fresh), int(rng.integers(100))
            text, op = f"set {name} to {v}.", "set"
        elif r < 0.55:
            name, v = sorted(live)[rng.integers(len(live))], int(rng.integers(100))
            text, op = f"change {name} to {v}.", "change"
        elif r < 0.62:
            name = sorted(live)[rng.integers(len(live))]
            v, text, op = live[name], f"{name} is still {live[name]}.", "still"
        elif r < 0.67 and len(live) > 2:
            name, v = sorted(live)[rng.integers(len(live))], None
            text, op = f"drop {name}.", "drop"
        elif r < 0.8:
            name, v, op = sorted(live)[rng.integers(len(live))], None, "mention"
            text = f"remember to check {name}."
        else:
            name, v, op = None, None, "chat"
            text = _CHATTER[rng.integers(len(_CHATTER))].format(
                adj=_ADJ[rng.integers(len(_ADJ))], noun=_NOUN[rng.integers(len(_NOUN))]
            )
        if op in ("set", "change", "still"):
            live[name] = v
            hist.setdefault(name, []).append((day, op, v))
        elif op == "drop":
            del live[name]
            hist[name].append((day, op, None))
        events.append(Event(text, float(day), session=day))
    return Ledger(int(seed), tuple(events), tuple(_questions(rng, hist, live, fresh, int(questions_per_ability))))


def _value_at(h: list[tuple[int, str, int | None]], day: int) -> int | None:
    out = None
    for d, _, v in h:
        if d <= day:
            out = v
    return out


def _questions(rng, hist, live, fresh, n) -> list[Question]:
    def pick(xs, m):
        xs = sorted(xs)
        return [xs[i] for i in sorted(rng.permutation(len(xs))[:m].tolist())] if xs else []

    once = [k for k, h in hist.items() if len(h) == 1 and k in live]
    changed = [k for k, h in hist.items() if k in live and any(op == "change" for _, op, _ in h)]
    qs = [Question("extraction", f"what is {k} now?", str(live[k])) for k in pick(once, n)]
    last_day = {k: hist[k][-1][0] for k in live}
    pairs = [(a, b) for a in sorted(live) for b in sorted(live) if a < b and last_day[a] != last_day[b]]
    for j in rng.permutation(len(pairs))[:n].tolist() if pairs else []:
        a, b = pairs[j]
        qs.append(Question("multi_session", f"what is {a} plus {b} now?", str(live[a] + live[b])))
    temporal = []
    for k in changed:
        days = [d for d in range(hist[k][0][0], hist[k][-1][0]) if _value_at(hist[k], d) not in (None, live[k])]
        if days:
            temporal.append((k, days))
    for j in rng.permutation(len(temporal))[:n].tolist() if temporal else []:
        k, days = temporal[j]
        d = days[rng.integers(len(days))]
        qs.append(Question("temporal", f"what was {k} on day {d}?", str(_value_at(hist[k], d))))
    qs += [Question("update", f"what is {k} now?", str(live[k])) for k in pick(changed, n)]
    dropped = pick([k for k in hist if k not in live], n // 2)
    unseen = [next(fresh) for _ in range(n - len(dropped))]
    qs += [Question("abstention", f"what is {k} now?", UNKNOWN) for k in dropped + unseen]
    return qs


# ---- the rule-based reader ----
_EVENT_LINE = re.compile(r"^day (\d+(?:\.\d+)?): (.*)$")
_FACT_LINE = re.compile(r"^day ([\d.?]+)-([\d.]+|now): ([a-z]+) = (\d+)$")
_CORE_LINE = re.compile(r"^core: ([a-z]+) = (\d+)$")
_Q_NOW = re.compile(r"^what is ([a-z]+) now\?$")
_Q_SUM = re.compile(r"^what is ([a-z]+) plus ([a-z]+) now\?$")
_Q_AT = re.compile(r"^what was ([a-z]+) on day (\d+)\?$")


def _lookup(lines: Sequence[str], key: str, day: float | None) -> int | None:
    core, facts, events = None, [], []
    for line in lines:
        if m := _CORE_LINE.match(line):
            if m.group(1) == key:
                core = int(m.group(2))
        elif m := _FACT_LINE.match(line):
            if m.group(3) == key:
                lo = -np.inf if m.group(1) == "?" else float(m.group(1))
                hi = np.inf if m.group(2) == "now" else float(m.group(2))
                facts.append((lo, hi, int(m.group(4))))
        elif m := _EVENT_LINE.match(line):
            for f in extract_facts(m.group(2)):
                if f.key == key:
                    events.append((float(m.group(1)), f.value))
    if day is None and core is not None:
        return core
    t = 1e300 if day is None else day  # "now": after every event, inside every open interval
    inside = [v for lo, hi, v in sorted(facts) if lo <= t < hi]
    if inside:
        return inside[-1]
    if facts and not events:
        return None
    value = None
    for d, v in events:  # lines arrive oldest first: the last one on or before the day holds
        if d <= t:
            value = v
    return value


def rule_reader(question: str, lines: Sequence[str]) -> str:
    """The exact answer the context lines support: a number, or "unknown" (see module docstring)."""
    if m := _Q_SUM.match(question):
        a, b = _lookup(lines, m.group(1), None), _lookup(lines, m.group(2), None)
        return UNKNOWN if a is None or b is None else str(a + b)
    if m := _Q_NOW.match(question):
        v = _lookup(lines, m.group(1), None)
    elif m := _Q_AT.match(question):
        v = _lookup(lines, m.group(1), float(m.group(2)))
    else:
        raise ValueError(f"question = {question!r}; expected one of the ledger question forms")
    return UNKNOWN if v is None else str(v)


def render_context(items: Sequence[Item], budget: int | None, tokenizer=TEXT_TOKENIZER) -> list[str]:
    """The lines a reader sees: the best-ranked items that fit `budget` tokens, shown core lines first, then oldest first.

    Items are kept by rank (core lines, then score, ties to the most recent), so a store's best items survive the
    window: a vector store keeps its nearest items, while full context and window stores (equal or recency scores)
    keep the most recent. Kept items are shown in time order, so "the last line about kobu" is its latest value.
    """
    ranked = sorted(items, key=lambda it: (it.kind != "core", -it.score, -it.time, -it.id))
    kept, used = [], 0
    for it in ranked:
        cost = len(tokenizer.encode(it.render())) + 1
        if budget is not None and used + cost > budget:
            continue
        kept.append(it)
        used += cost
    return [it.render() for it in sorted(kept, key=lambda it: (it.kind != "core", it.time, it.id))]


def asked_names(question: str) -> list[str]:
    """The variable names a ledger question asks about ("what is kobu plus lima now?" -> ["kobu", "lima"])."""
    for pattern in (_Q_SUM, _Q_NOW, _Q_AT):
        if m := pattern.match(question):
            return [g for g in m.groups() if not g.isdigit()]
    raise ValueError(f"question = {question!r}; expected one of the ledger question forms")


def asked_day(question: str) -> float | None:
    """The day an "as of" question asks about ("what was kobu on day 4?" -> 4.0); None for the other forms."""
    return float(m.group(2)) if (m := _Q_AT.match(question)) else None


def gold_context(
    ledger: Ledger, question: Question, budget: int | None, tokenizer=TEXT_TOKENIZER, *, time_aware: bool = False
) -> list[str]:
    """The lines a perfect retriever would bring for `question`: every utterance naming an asked variable, the most
    recent first into the `budget` (for "as of day d", those on or before d first), shown in time order.
    `time_aware`: for "as of day d", only those on or before d (a perfect time-aware retriever).

    The reader's ceiling: what it answers from the right lines, whatever a store retrieves. The rule reader answers
    from them exactly except where the budget cannot hold a question's lines (sums over two long histories).
    """
    names = set(asked_names(question.text))
    day = np.inf if (asked := asked_day(question.text)) is None else asked
    items = [
        Item(n + 1, e.text, 1.0 if e.time <= day else 0.5, e.time, "event")
        for n, e in enumerate(ledger.events)
        if names & set(e.text[:-1].split()) and (e.time <= day or not time_aware)
    ]
    return render_context(items, budget, tokenizer)


def time_filter(store, question: str) -> dict:
    """The retrieval arguments that narrow `store` to the time `question` asks about: {"as_of": d} for a bi-temporal
    store, {"until": d} for one that keeps utterances, {} for a question about now or a store that keeps only the
    present (`store.time_query`). LongMemEval's time-aware query expansion, with the day read exactly."""
    day, how = asked_day(question), getattr(store, "time_query", None)
    return {} if day is None or how is None else {how: day}


Reader = Callable[[str, Sequence[str]], str]


def ask(
    store,
    ledger: Ledger,
    *,
    k: int = 8,
    budget: int | None = 1024,
    tokenizer=TEXT_TOKENIZER,
    write: bool = True,
    time_aware: bool = False,
) -> list[tuple[str, list[str]]]:
    """Writes `ledger` into `store` (unless `write=False`), then [(question, context lines)] for its questions.

    `time_aware`: an "as of day d" question retrieves with the store's time filter (`time_filter`)."""
    if write:
        for event in ledger.events:
            store.write(event)
    out = []
    for q in ledger.questions:
        narrow = time_filter(store, q.text) if time_aware else {}
        out.append((q.text, render_context(store.retrieve(q.text, k, **narrow), budget, tokenizer)))
    return out


def score(
    ledger: Ledger, contexts: Sequence[tuple[str, list[str]]], reader: Reader = rule_reader, tokenizer=TEXT_TOKENIZER
) -> dict:
    """Answers every (question, lines) with `reader`; per-question records and accuracy/tokens per ability.

    `reader(question, lines) -> answer`; a reader with `answer_batch([(question, lines)])` gets all questions at once.
    """
    batch = getattr(reader, "answer_batch", None)
    answers = batch(contexts) if batch is not None else [reader(q, lines) for q, lines in contexts]
    records = []
    for q, (_, lines), got in zip(ledger.questions, contexts, answers):
        tokens = sum(len(tokenizer.encode(x)) + 1 for x in lines) + len(tokenizer.encode(q.text))
        records.append(
            dict(
                ability=q.ability,
                question=q.text,
                answer=q.answer,
                got=got,
                correct=got == q.answer,
                tokens_read=tokens,
            )
        )
    return dict(records=records, **summarise(records))


def evaluate(
    store,
    ledger: Ledger,
    reader: Reader = rule_reader,
    *,
    k: int = 8,
    budget: int | None = 1024,
    tokenizer=TEXT_TOKENIZER,
    time_aware: bool = False,
) -> dict:
    """Writes `ledger` into `store`, asks its questions, scores `reader`'s answers (`ask` then `score`)."""
    contexts = ask(store, ledger, k=k, budget=budget, tokenizer=tokenizer, time_aware=time_aware)
    return score(ledger, contexts, reader, tokenizer)


def summarise(records: Sequence[dict]) -> dict:
    """Accuracy and mean tokens read, per ability and overall."""
    out = {"accuracy": {}, "tokens_read": {}, "count": {}}
    for ab in ABILITIES + ("all",):
        rs = [r for r in records if ab == "all" or r["ability"] == ab]
        out["count"][ab] = len(rs)
        out["accuracy"][ab] = float(np.mean([r["correct"] for r in rs])) if rs else None
        out["tokens_read"][ab] = float(np.mean([r["tokens_read"] for r in rs])) if rs else None
    return out
