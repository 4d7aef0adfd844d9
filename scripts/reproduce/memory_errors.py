"""The LM answerer's wrong answers in the memory study, each with the lines it read and a cause (docs/results/memory.md).

  .venv/bin/python -m scripts.reproduce.memory_errors --workdir=runs/memory_study --stores=facts,temporal,gold

It loads the answerer trained in --workdir (by `scripts.reproduce.memory`; nothing is trained), writes the study's
ledgers into fresh stores in a temporary folder, asks every question and, for each answer that differs from the
ledger's, names a cause (`cause`), first match wins:

  lost            the retrieved lines do not support the answer (the rule reader misses it too): the store's loss
  near_namesake   the value of a line whose variable shares a character trigram with an asked one ("zogi" for "fogi")
  wrong_day       an "as of" answer restating another day than the asked one ("day 20" for "day 203")
  wrong_line      the value of another line of the asked variable (an earlier or later value)
  abstained       "unknown" where the lines hold the value
  other           anything else (a value no line holds)

It prints counts per store, ability and cause, then up to --show examples per cause with their lines, and, for
the "as of" questions, the accuracy by where the line that holds the asked day sits among the asked variable's
lines (`answer_line`: first, middle, last or only): a reader that compares days is right wherever the line sits,
one that learnt a position is right only there.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import tempfile
from collections.abc import Sequence

from framework.memory.harness import _CORE_LINE, _EVENT_LINE, _FACT_LINE, _Q_AT, UNKNOWN, asked_names, rule_reader
from framework.memory.ledger import extract_facts

CAUSES = ("lost", "near_namesake", "wrong_day", "wrong_line", "abstained", "other")


def _trigrams(name: str) -> set[str]:
    w = f"#{name}#"
    return {w[i : i + 3] for i in range(len(w) - 2)}


def line_facts(lines: Sequence[str]) -> list[tuple[str, float | None, int | None]]:
    """(variable, day, value) for every fact a line states, in the order shown: a fact line's day is where its
    interval starts (-1 for "?"), a core line's None; a drop's value is None."""
    out = []
    for line in lines:
        if m := _FACT_LINE.match(line):
            out.append((m.group(3), -1.0 if m.group(1) == "?" else float(m.group(1)), int(m.group(4))))
        elif m := _CORE_LINE.match(line):
            out.append((m.group(1), None, int(m.group(2))))
        elif m := _EVENT_LINE.match(line):
            out += [(f.key, float(m.group(1)), f.value) for f in extract_facts(m.group(2))]
    return out


def line_values(lines: Sequence[str]) -> list[tuple[str, str]]:
    """(variable, value) for every value a line states (fact, core and event lines; drops have none)."""
    return [(k, str(v)) for k, _, v in line_facts(lines) if v is not None]


def answer_line(question: str, lines: Sequence[str]) -> str | None:
    """For "what was kobu on day d?": where the line holding day d sits among kobu's lines that state a value (or
    end one: a drop) in the order shown: "first", "middle", "last" or "only"; None when no line holds it."""
    if not (m := _Q_AT.match(question)):
        return None
    key, day = m.group(1), float(m.group(2))
    starts = [d for k, d, _ in line_facts(lines) if k == key and d is not None]
    held = [i for i, d in enumerate(starts) if d <= day]
    if not held:
        return None
    i = held[-1]
    return "only" if len(starts) == 1 else "first" if i == 0 else "last" if i == len(starts) - 1 else "middle"


def cause(question: str, lines: Sequence[str], answer: str, got: str, worked: str) -> str | None:
    """Why `got` (the final answer of the worked answer `worked`) is not `answer`; None when it is right."""
    if got == answer:
        return None
    if rule_reader(question, lines) != answer:
        return "lost"
    names = asked_names(question)
    values = line_values(lines)
    grams = set().union(*map(_trigrams, names))
    if any(v == got and k not in names and _trigrams(k) & grams for k, v in values):
        return "near_namesake"
    if (m := re.search(r" on day (\d+)", question)) and not re.match(rf"\S+ on day {m.group(1)}\b", worked):
        return "wrong_day"
    if any(v == got and k in names for k, v in values):
        return "wrong_line"
    return "abstained" if got == UNKNOWN else "other"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/memory_study", help="a trained answerer's run (config.json, checkpoints)")
    p.add_argument("--stores", default="facts,temporal,gold")
    p.add_argument("--lengths", default="1000,3000")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--show", type=int, default=3, help="examples printed per cause (0: counts only)")
    args = p.parse_args(argv)

    import jax
    import ml_collections

    from experiments import memory as experiment
    from framework.memory import answerer, harness
    from framework.training import loop
    from framework.training.checkpoint import Checkpointer

    with open(os.path.join(args.workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model_cfg, task = experiment.make_task(config)
    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), async_save=False)
    done = ckpt.latest_step()
    ckpt.close()
    if done is None or done < config.train.steps:
        raise SystemExit(f"{args.workdir} holds step {done} of {config.train.steps}: train it to the end first")
    state = loop.train(config, args.workdir, task)  # at its last step: restores, trains nothing
    reader = answerer.LMReader(jax.device_get(state.params), model_cfg)
    counts, examples, at = collections.Counter(), collections.defaultdict(list), collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            for n in map(int, args.lengths.split(",")):
                ledger = harness.make_ledger(seed, n, questions_per_ability=config.study.questions_per_ability)
                for kind in args.stores.split(","):
                    path = os.path.join(tmp, f"{kind}-n{n}-s{seed}.db")
                    contexts = experiment.study_contexts(
                        kind, ledger, path, budget=config.task.budget, k=config.study.k
                    )
                    for q, (_, lines), worked in zip(ledger.questions, contexts, reader.worked_batch(contexts)):
                        counts[kind, q.ability, "asked"] += 1
                        if (where := answer_line(q.text, lines)) is not None:
                            at[kind, where] += 1
                            at[kind, where, "right"] += answerer.final_answer(worked) == q.answer
                        why = cause(q.text, lines, q.answer, answerer.final_answer(worked), worked)
                        if why is not None:
                            counts[kind, q.ability, why] += 1
                            examples[why].append(
                                f"{kind} n={n} seed={seed}: {q.text} {q.answer} <- {worked!r}\n    "
                                + "\n    ".join(lines)
                            )
    print("| store | ability | asked | wrong | " + " | ".join(CAUSES) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(CAUSES))
    for kind, ability in dict.fromkeys((k, a) for k, a, _ in counts):
        wrong = sum(counts[kind, ability, c] for c in CAUSES)
        cells = " | ".join(str(counts[kind, ability, c]) for c in CAUSES)
        print(f"| {kind} | {ability} | {counts[kind, ability, 'asked']} | {wrong} | {cells} |")
    print("\n\"as of\" accuracy by the answer's line among the asked variable's lines (right / asked):\n")
    where = ("first", "middle", "last", "only")
    print("| store | " + " | ".join(where) + " |")
    print("|---|" + "---:|" * len(where))
    for kind in dict.fromkeys(k for k, *_ in at):
        print(f"| {kind} | " + " | ".join(f"{at[kind, w, 'right']} / {at[kind, w]}" for w in where) + " |")
    for why in CAUSES:
        for text in examples[why][: args.show]:
            print(f"\n[{why}] {text}")


if __name__ == "__main__":
    main()
