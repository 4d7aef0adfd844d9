"""Policies for search: extend a batch of partial traces by one line, or to the answer, in one batched call.

A policy has one method, `extend(problems, prefixes, *, until, greedy=False, row_keys=None, call_key=(0,))`, and a
`num_params` attribute (reported beside results; costs are `SearchResults.flops` of the model's
config). `prefixes[i]` is the completion written so far for `problems[i]` (text after
the prompt, "" at the start); `until="line"` writes exactly one more line (always returned ending in "\\n": a line
the model leaves unfinished, by stopping or by running out of tokens, is closed so the search always advances),
`until="answer"` writes until the answer line (or the model stops). `row_keys` name each row's random stream
(both `framework.search.toy.ToyPolicy` and `LMPolicy` draw per row from them); `call_key` names the call.

`LMPolicy` runs a Lumen LM through `framework.inference.generate`, all rows in one compiled prefill + decode per
chunk of `batch_size` rows. Rows are chunked in order of length (prompt + prefix, then K), so a chunk pads little
and its decode loop stops when its longest chain does. Its randomness is per row: row i samples with its own PRNG
key, a 64-bit hash of (`call_key`, `row_keys[i]`) folded into `jax.random.key(0)` (`row_key_data`; without
`row_keys`, row i is keyed by its index in the call), handed to `generate` as a batch of keys. A row's sample then
depends only on its keys and its text, never on the other rows, the chunking or the padding, so a search that keys
every sample by (problem, sample id) writes the same text batched or alone (up to the backend's rounding of batched
matmuls, which could flip a draw that sits on a boundary).
Given a `mesh`, the parameters are replicated on it and every chunk's batch is split over its batch axes (the rules'
`batch` entry, `data` by default): the model's logical activation constraints shard the decode, same tokens.

Given a `tokenizer` (e.g. an imported Hugging Face checkpoint's `HFTokenizer`), the policy reads and writes the task's
text in the model's own tokens: each row's prompt is the model's BOS and the tokenized text of the question line plus
the prefix (re-tokenized as one text, so a prefix the model wrote may tokenize differently from how it was sampled),
a line ends at any token whose text holds a newline or at EOS, and the new tokens are decoded back to text, cut to
as many characters as the token cap (what a character-level policy could write: a line of the format, or the gold
solution plus one line).
Characters outside the arithmetic alphabet are written as "?" (the checker rejects such a line either way), so every
trace is text a verifier on the arithmetic character tokenizer can read. Token counts (`Extension.tokens`,
`prompt_tokens`) are in the policy's own tokens, which is what `lm.flops` of its config prices.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from framework import inference, sharding
from framework.inference.generate import bucket_length
from framework.models import lm
from framework.tasks import arithmetic, data
from framework.tasks import tokenizer as tok
from framework.verifiers import traces

UNTIL = ("line", "answer")


class Extension(NamedTuple):
    """New text per row, tokens generated per row, prompt (prefill) tokens per row."""

    texts: list[str]
    tokens: np.ndarray
    prompt_tokens: np.ndarray


def line_tokens(modulus: int) -> int:
    """Tokens in the longest line of the format ("aa+bb=cc\\n")."""
    return 3 * arithmetic.number_width(modulus) + 3


def max_lines(problem: arithmetic.Problem, slack: int = 2) -> int:
    """Lines a search lets a trace write before calling it finished: K steps + the answer line + `slack`."""
    return problem.num_steps + 1 + slack


def check_extend_args(problems: Sequence[Any], prefixes: Sequence[str], until: str) -> None:
    """ValueError for mismatched lengths or an unknown `until`, before any model runs."""
    if until not in UNTIL:
        raise ValueError(f"policy.extend: until={until!r}; expected one of {UNTIL}")
    if len(problems) != len(prefixes):
        raise ValueError(f"policy.extend: {len(problems)} problems but {len(prefixes)} prefixes")


def close_line(text: str) -> str:
    """One line ending in "\\n": text up to its first newline, or all of it closed with one."""
    cut = text.find("\n")
    return text + "\n" if cut < 0 else text[: cut + 1]


def batch_shards(mesh: jax.sharding.Mesh | None, rules=sharding.DEFAULT_RULES) -> int:
    """How many ways a batch is split on `mesh` (the product of the `batch` rule's mesh axes); 1 without a mesh."""
    if mesh is None:
        return 1
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """`tree`'s arrays copied onto every device of `mesh` (search shards the batch, not the small models)."""
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _canonical(key: Any, where: str) -> Any:
    """`key` as nested tuples of Python ints and strings, so equal keys print (and hash) alike whatever their types."""
    if isinstance(key, (bool, np.bool_)):
        return int(key)
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, str):
        return key
    if isinstance(key, (tuple, list)):
        return tuple(_canonical(k, where) for k in key)
    raise ValueError(f"{where}: a key holds {key!r} ({type(key).__name__}); expected ints, strings and tuples of them")


def row_key_data(call_key: tuple, row_keys: Sequence[tuple]) -> np.ndarray:
    """uint32 [R, 2]: the two 32-bit halves of a blake2b-64 hash of (call_key, row key) for each row.

    64 bits keep distinct rows apart (two of a million keys collide with probability ~3e-8)."""
    call = _canonical(tuple(call_key), "policy.extend call_key")
    words = [
        np.frombuffer(
            hashlib.blake2b(repr((call, _canonical(k, "policy.extend row_keys"))).encode(), digest_size=8).digest(),
            "<u4",
        )
        for k in row_keys
    ]
    return np.asarray(words, np.uint32).reshape(len(row_keys), 2)


@jax.jit
def _keys_from_data(data_R2: jax.Array) -> jax.Array:
    """Typed PRNG keys [R]: `fold_in(fold_in(key(0), hi), lo)` for each row's two hash words."""
    base = jax.random.key(0)
    return jax.vmap(lambda w: jax.random.fold_in(jax.random.fold_in(base, w[0]), w[1]))(data_R2)


class LMPolicy:
    """A Lumen LM as a step-wise sampler (temperature / top-k / top-p), batched through `inference.generate`."""

    def __init__(
        self,
        params: lm.Params,
        cfg: lm.LMConfig | Mapping[str, Any],
        *,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        batch_size: int = 512,
        min_batch: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        rules=sharding.DEFAULT_RULES,
        tokenizer: tok.Tokenizer | None = None,
    ):
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"LMPolicy: temperature must be finite and >= 0, got {temperature}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"LMPolicy: batch_size must be an int >= 1, got {batch_size!r}")
        self.params, self.cfg = params, lm.LMConfig.from_config(cfg)
        self.temperature, self.top_k, self.top_p, self.batch_size = float(temperature), top_k, top_p, batch_size
        # Chunks are padded to a power of two >= min_batch rows: min_batch = batch_size gives one batch shape.
        self.min_batch = min(int(min_batch), batch_size)
        self.mesh, self.rules, self.shards = mesh, rules, batch_shards(mesh, rules)
        if mesh is not None:
            self.params = replicate(params, mesh)
        # None: the arithmetic character tokenizer (the task's own ids); otherwise the model's tokenizer.
        self.tokenizer = tokenizer
        if tokenizer is None:
            self._line_stop, self._eos = (traces.NEWLINE_ID, tok.EOS_ID), (tok.EOS_ID,)
        else:
            if tokenizer.vocab_size > self.cfg.vocab_size:
                raise ValueError(
                    f"LMPolicy: tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids, more than the model's "
                    f"vocab_size={self.cfg.vocab_size}"
                )
            self._eos = tuple(self.cfg.eos_ids) or (() if tokenizer.eos_id is None else (tokenizer.eos_id,))
            self._line_stop = newline_token_ids(tokenizer) + self._eos

    @property
    def num_params(self) -> int:
        """The policy LM's parameter count (FLOPs go through `lm.flops` of `self.cfg`)."""
        return lm.param_count(self.cfg)

    def extend(
        self,
        problems: Sequence[arithmetic.Problem],
        prefixes: Sequence[str],
        *,
        until: str,
        greedy: bool = False,
        row_keys: Sequence[tuple] | None = None,
        call_key: tuple = (0,),
    ) -> Extension:
        """Continues every prefix by one line (`until="line"`) or to the answer line (`until="answer"`).

        Sampled rows draw from their own key, a hash of (`call_key`, `row_keys[i]`) (row i's index when `row_keys`
        is None), so a row's text does not depend on the rest of the batch."""
        check_extend_args(problems, prefixes, until)
        if row_keys is None:
            row_keys = [(i,) for i in range(len(problems))]
        if len(row_keys) != len(problems):
            raise ValueError(f"policy.extend: {len(problems)} problems but {len(row_keys)} row_keys")
        greedy_call = greedy or self.temperature == 0.0
        key_data = None if greedy_call else row_key_data(call_key, row_keys)
        gen, pro = np.zeros(len(problems), np.int64), np.zeros(len(problems), np.int64)
        encoded = [self._encode(p, x) for p, x in zip(problems, prefixes)]
        order = sorted(range(len(problems)), key=lambda i: (len(encoded[i]), problems[i].num_steps))
        texts_sorted: list[str] = []
        for lo in range(0, len(problems), self.batch_size):
            rows = order[lo : lo + self.batch_size]
            ps, prompts = [problems[i] for i in rows], [encoded[i] for i in rows]
            # Caps in characters bound the tokens too: every token of the task's text is at least one character.
            if until == "line":
                stop, max_new = self._line_stop, max(line_tokens(p.modulus) for p in ps)
            else:
                # The gold length plus one spare line and the EOS, in steps of 32: the decode loop stops when every
                # row has, so a generous cap costs only cache slots, and one cap for all prefixes shares compiles.
                need = max(arithmetic.solution_length(p.num_steps, p.modulus) + line_tokens(p.modulus) + 1 for p in ps)
                stop, max_new = self._eos, -(-need // 32) * 32
            room = self.cfg.max_seq_len - max(len(x) for x in prompts)
            if room < 1:
                raise ValueError(f"LMPolicy.extend: a prefix of {max(len(x) for x in prompts)} tokens fills the model")
            max_new = min(max_new, room)
            # Pad the batch to a power of two (copies of row 0, dropped) so a search's varying widths share compiles,
            # and to a multiple of the mesh's batch shards.
            B = len(prompts)
            Bp = bucket_length(B, 1 << 30, minimum=self.min_batch)
            padded = prompts + [prompts[0]] * (Bp + (-Bp) % self.shards - B)
            # Each row brings its own key; the padding rows repeat row 0's (their samples are dropped).
            keys = None if greedy_call else _keys_from_data(key_data[rows + [rows[0]] * (len(padded) - B)])
            with sharding.rules_context(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext():
                out = inference.generate(
                    self.params,
                    self.cfg,
                    padded,
                    max_new_tokens=max_new,
                    temperature=0.0 if greedy_call else self.temperature,
                    top_k=None if greedy_call else self.top_k,
                    top_p=None if greedy_call else self.top_p,
                    stop_tokens=stop,
                    rng=keys,
                )
            tokens, lengths = np.asarray(out.tokens)[:B], np.asarray(out.lengths)[:B]
            for b in range(B):
                # The character cap is the token cap: a line or trace of the imported model's text is no longer
                # than the character-level policy could write (its tokens may hold several characters each).
                new = self._decode(tokens[b, : lengths[b]])[:max_new]
                texts_sorted.append(close_line(new) if until == "line" else traces.truncate_after_answer(new))
            gen[rows] = lengths
            pro[rows] = [len(x) for x in prompts]
        texts = [""] * len(problems)
        for i, t in zip(order, texts_sorted):
            texts[i] = t
        return Extension(texts, gen, pro)

    def _encode(self, problem: arithmetic.Problem, prefix: str) -> np.ndarray:
        """The row's prompt ids: BOS, the question line and the prefix, in the policy's tokens."""
        if self.tokenizer is None:
            return np.concatenate([data.encode_prompt(problem), tok.encode(prefix)]).astype(np.int32)
        bos = [] if self.cfg.bos_id is None else [self.cfg.bos_id]
        text = self.tokenizer.encode(arithmetic.format_prompt(problem) + prefix)
        return np.concatenate([np.asarray(bos, np.int32), text]).astype(np.int32)

    def _decode(self, ids: np.ndarray) -> str:
        if self.tokenizer is None:
            return tok.decode(ids)
        return to_task_alphabet(self.tokenizer.decode(ids))


def newline_token_ids(tokenizer: tok.Tokenizer) -> tuple[int, ...]:
    """Every id whose decoded text holds a newline: the tokens that end a line in that tokenizer's vocabulary."""
    return tuple(i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode(np.asarray([i], np.int32)))


_ALPHABET = frozenset(tok.ALPHABET)


def to_task_alphabet(text: str) -> str:
    """`text` with every character outside the arithmetic alphabet replaced by "?" (a character the task never uses)."""
    return "".join(c if c in _ALPHABET else "?" for c in text)
