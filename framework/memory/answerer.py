"""The LM answerer: a Lumen LM (text tokenizer) that reads a store's retrieved lines and answers, or abstains.

Glossary: B batch, T tokens, N new tokens.

The dialogue format of one question (prompt, then the completion the model learns; the pipeline adds BOS/EOS):

    Q: what is kobu now?            <- the question first (the model reads the context knowing it)
    day 3: set kobu to 12.          <- the retrieved context, rendered by `harness.render_context`
    kobu = 40 (day 5-now)
    core: lima = 7
    A:                              <- prompt ends here
     40                             <- completion: " <answer>\\n" (a number or "unknown")

Training data (`reading_source`): ledgers from `harness.make_ledger` with contexts shaped like each store's
(utterance subsets as a vector store or window returns them, current facts as the fact store, validity intervals
as the temporal store, core lines plus utterances as MemGPT), built without a database so a batch is cheap; the
target is what the context supports (`harness.rule_reader`), so the model learns to read, not to guess: when the
asked variable is absent the target is "unknown". It trains through the one loop as a `loop.Task`
(`experiments.memory.make_task`).

`LMReader(params, cfg)` is a harness reader: `reader(question, lines)` or `reader.answer_batch(pairs)` (one
greedy `generate` call per batch), stopping at EOS or the newline.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from framework.memory.base import Item
from framework.memory.harness import make_ledger, render_context, rule_reader
from framework.memory.ledger import extract_facts
from framework.tasks.data import TextExample, TextSource
from framework.tasks.tokenizer import TEXT_TOKENIZER

__all__ = ["LMReader", "answer_mask", "format_prompt", "reading_example", "reading_source"]


def format_prompt(question: str, lines: Sequence[str]) -> str:
    """The answerer's prompt: "Q: <question>", the context lines, then "A:".

    The question comes first so that a small model reads the context knowing what is asked: it can mark the lines
    about the asked variable as it reads them, and "A:" only has to copy from the marked line.
    """
    return f"Q: {question}\n" + "".join(line + "\n" for line in lines) + "A:"


def answer_mask(
    tokens_BT: np.ndarray, segment_ids_BT: np.ndarray | None = None, tokenizer=TEXT_TOKENIZER
) -> np.ndarray:
    """[B, T] float32: 1 on each example's answer tokens (everything after its "A:", EOS included), else 0.

    Training reads the whole dialogue with a weight on the context (`experiments.memory`: `task.context_weight`) and
    the full weight on the answer; this finds the answer in packed rows (`segment_ids_BT`, one id per example)
    without the prompt lengths, since "A:" occurs once per example, at the end of its prompt.
    """
    tokens_BT = np.asarray(tokens_BT)
    seg_BT = np.ones_like(tokens_BT) if segment_ids_BT is None else np.asarray(segment_ids_BT)
    a, colon = (int(t) for t in tokenizer.encode("A:"))
    marker_BT = np.zeros(tokens_BT.shape, np.int32)
    marker_BT[:, 2:] = (tokens_BT[:, :-2] == a) & (tokens_BT[:, 1:-1] == colon)  # the token right after "A:"
    seen_BT = np.cumsum(marker_BT, axis=1)
    new_seg_BT = np.ones(tokens_BT.shape, bool)
    new_seg_BT[:, 1:] = seg_BT[:, 1:] != seg_BT[:, :-1]
    start_BT = np.maximum.accumulate(np.where(new_seg_BT, seen_BT - marker_BT, 0), axis=1)  # markers before it
    return ((seen_BT - start_BT > 0) & (seg_BT > 0) & (tokens_BT != tokenizer.pad_id)).astype(np.float32)


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


def reading_example(seed: int, *, budget: int = 256, events: tuple[int, int] = (6, 64)) -> TextExample:
    """One training example: a random ledger, one of its questions, a store-shaped context and the read answer."""
    rng = np.random.default_rng(seed)
    ledger = make_ledger(
        int(rng.integers(1 << 30)), int(rng.integers(events[0], events[1] + 1)), questions_per_ability=2
    )
    # Abstention questions at a lower weight: with the contexts the cut empties, "unknown" would be half the targets.
    weights = np.array([0.4 if q.ability == "abstention" else 1.0 for q in ledger.questions])
    q = ledger.questions[int(rng.choice(len(weights), p=weights / weights.sum()))]
    asked = [
        w
        for w in q.text.replace("?", "").split()
        if w not in ("what", "is", "was", "now", "plus", "on", "day") and not w.isdigit()
    ]
    style = int(rng.integers(4))
    hist = _intervals(ledger.events)
    # A few other lines (0-5, as a k = 8 retrieval brings beside the asked ones), so the asked lines usually survive
    # the budget and "unknown" is mostly the target when the context really lacks them, not because the cut did.
    others = len(ledger.events) if style in (0, 3) else len(hist)
    keep_asked, keep_other = rng.uniform(0.85, 1.0), min(1.0, rng.uniform(0.0, 5.0) / max(others, 1))

    def keep(key) -> bool:
        return rng.random() < (keep_asked if key in asked else keep_other)

    items: list[Item] = []
    if style in (0, 3):  # utterances (vector store, window, archival)
        for n, e in enumerate(ledger.events):
            keys = [f.key for f in extract_facts(e.text)] or [w for w in e.text[:-1].split() if w in hist]
            if keep(keys[0] if keys else None):
                items.append(Item(n + 1, e.text, 1.0, e.time, "event"))
    if style == 1:  # current facts (mem0)
        items += [
            Item(0, f"{k} = {h[-1][2]}", 1.0, h[-1][3], "fact", k, h[-1][0], None)
            for k, h in hist.items()
            if h and h[-1][1] is None and keep(k)
        ]
    if style == 2:  # validity intervals (bi-temporal)
        items += [
            Item(0, f"{k} = {v}", 1.0, t, "fact", k, vf, vt) for k, h in hist.items() if keep(k) for vf, vt, v, t in h
        ]
    if style == 3:  # core lines (MemGPT)
        items += [
            Item(0, f"{k} = {h[-1][2]}", 2.0, 0.0, "core")
            for k, h in hist.items()
            if h and h[-1][1] is None and keep(k)
        ]
    lines = render_context(items, budget)
    return TextExample(format_prompt(q.text, lines), f" {rule_reader(q.text, lines)}\n")


def _example_at(stream_seed: int, index: int, *, budget: int, events: tuple[int, int]) -> TextExample:
    return reading_example(
        int(np.random.SeedSequence([stream_seed, index]).generate_state(1)[0]), budget=budget, events=events
    )


def reading_source(budget: int = 256, events: tuple[int, int] = (6, 64)) -> TextSource:
    """The answerer's training stream (see module docstring); `budget` bounds the context's tokens."""
    if int(budget) <= 0 or not 1 <= events[0] <= events[1]:
        raise ValueError(f"budget = {budget}, events = {events}; expected budget > 0 and 1 <= lo <= hi")
    longest_q, longest_a = len("what is abababab plus abababab now?"), len(" unknown\n")
    return TextSource(
        functools.partial(_example_at, budget=int(budget), events=tuple(events)),
        name="ledger_reading",
        min_tokens=16,
        max_tokens=1 + int(budget) + 3 + longest_q + 3 + longest_a + 1,
        hint=" (the answerer needs seq_len >= budget + 56)",
    )


class LMReader:
    """A harness reader backed by a Lumen LM: greedy answers to (question, context lines)."""

    def __init__(self, params, cfg, *, max_new_tokens: int = 10, batch_size: int = 32, tokenizer=TEXT_TOKENIZER):
        from framework.models import lm

        self.params, self.cfg = params, lm.LMConfig.from_config(cfg)
        if self.cfg.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"model vocab_size {self.cfg.vocab_size} != the {tokenizer.name!r} tokenizer's "
                f"{tokenizer.vocab_size}: the answerer reads the text tokenizer"
            )
        self.tokenizer, self.max_new_tokens, self.batch_size = tokenizer, int(max_new_tokens), int(batch_size)
        self.newline = int(tokenizer.encode("\n")[0])

    def answer_batch(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """Greedy answers to [(question, lines)], in order."""
        from framework.inference import generate

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
            res = generate(
                self.params,
                self.cfg,
                chunk,
                max_new_tokens=self.max_new_tokens,
                stop_tokens=(self.tokenizer.eos_id, self.newline),
            )
            toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
            out += [self.tokenizer.decode(toks[b, : lens[b]]).strip() for b in range(n)]
        return out

    def __call__(self, question: str, lines: Sequence[str]) -> str:
        """The greedy answer to one question."""
        return self.answer_batch([(question, lines)])[0]
