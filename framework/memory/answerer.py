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

Its training stream is `framework.memory.reading` (store-shaped contexts, drills, near-namesakes, the
curriculum); it trains through the one loop as a `loop.Task` (`experiments.memory.make_task`). `lookup_probe`
measures, during training, whether it matches names.

`LMReader(params, cfg, decision=...)` is a harness reader: `reader(question, lines)` or
`reader.answer_batch(pairs)` (one `generate` call per batch, stopping at EOS or the newline), greedy or by the
scored rule (an "unknown" replaced by a likelier number answer; see `LMReader`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from framework.memory.base import Item
from framework.memory.harness import _Q_AT, _Q_NOW, _Q_SUM, UNKNOWN, _lookup, _names, near_names, render_context
from framework.tasks.tokenizer import TEXT_TOKENIZER

__all__ = [
    "ANSWER_TOKENS",
    "DECISIONS",
    "LMReader",
    "NoUnknown",
    "answer_mask",
    "column_sum",
    "final_answer",
    "format_prompt",
    "lookup_probe",
    "lookup_probe_examples",
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


# The longest worked answer (a sum of two 8-letter names' two-digit values) with its leading space and newline, in
# tokens of the text tokenizer (one per character).
ANSWER_TOKENS = len(f" abababab + abababab = 99 + 99: {column_sum(99, 99)} = 198\n")


def lookup_probe_examples(
    lines_per_context: Sequence[int] = (1, 2, 3), count: int = 64, seed: int = 123, tokenizer=TEXT_TOKENIZER
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Held-out plain lookups that show whether the answerer matches names: {"n2_event": (tokens_BT, at_B, gold_B)}.

    For each number of lines n and each line style (utterances "day d: set kobu to 12." or fact lines
    "day d-now: kobu = 12"), `count` contexts of n variables with fresh names and uniform values, one asked; the
    tokens run up to the worked answer's "kobu =", `at_B` is the last position and `gold_B` the first token of the
    value. A reader that copies a value without matching the name scores ~1/n of its one-line score. The "near"
    sets (n >= 2: "n3_near") are fact lines of near-namesakes (`near_names`, "dabo", "zabo", "kazabo"): a reader
    that matches only a name's last characters falls on them. The "absent" sets (n >= 2: "n3_absent") are the
    same lines asked for one more edit that none of them has: the gold token starts "unknown" (abstention where a
    similarity search returns only near-namesakes, as the fact store does for a name never set).
    """
    styles = ("event", "fact", "near", "absent")
    out = {}
    for n in lines_per_context:
        for style in styles[: 4 if n > 1 else 2]:
            rng = np.random.default_rng([seed, n, styles.index(style)])
            rows, at, gold = [], [], []
            for _ in range(count):
                names = _names(rng, n)
                if style in ("near", "absent"):
                    names = names[:1] + near_names(rng, names[0], n - 1 + (style == "absent"))
                    names = [names[int(j)] for j in rng.permutation(len(names))]
                if style == "absent":  # one of n + 1 namesakes asked, the other n shown
                    asked = names[int(rng.integers(n))]
                    names = [k for k in names if k != asked]
                items = []
                for j, k in enumerate(names):
                    v, t = int(rng.integers(100)), float(rng.integers(0, 9))
                    items.append(
                        Item(j + 1, f"set {k} to {v}.", 1.0, t, "event")
                        if style == "event"
                        else Item(j + 1, f"{k} = {v}", 1.0, t, "fact", k, t, None)
                    )
                lines = render_context(items, None)
                q = f"what is {asked if style == 'absent' else names[int(rng.integers(n))]} now?"
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
