"""ORM and PRM value heads on a Lumen LM: a linear read-out of the final hidden state at each line's closing newline.

Glossary: B traces, T tokens, L lines, D model width.

params = {"lm": <framework.models.lm params>, "head": {"w": [D], "b": []}}. The score of line j is
sigmoid(w · h[ends[j]] + b), h = the `final_norm` hookpoint. A PRM is trained on every labelled line; an ORM is the
same model trained only on the last line's outcome label (`labels.outcome_labels`), so both score partial traces
the same way and plug into search as scorers. Training is masked binary cross-entropy (soft labels allowed) with a
small optax loop; the LM is fine-tuned with the head unless `freeze_lm`.

    v = init(policy_params, cfg, jax.random.key(0))
    v, hist = fit(v, cfg, problems, completions, line_labels, steps=300)
    scorer = Verifier(v, cfg)
    scorer.score(problems, completions).scores          # one float array per trace, one score per finished line
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxtyping import Array, Float, Int

from framework.inference.generate import bucket_length
from framework.models import lm
from framework.tasks import arithmetic, data
from framework.verifiers import traces

KINDS = ("prm", "orm")


def init(lm_params: lm.Params, cfg: lm.LMConfig | Mapping[str, Any], rng: jax.Array) -> dict:
    """Verifier params: the LM's (usually the policy's, as a warm start) plus a zero-initialised head."""
    del rng  # a zero head starts every line at p = 0.5 whatever the hidden state: no draw needed
    cfg = lm.LMConfig.from_config(cfg)
    return {"lm": lm_params, "head": {"w": jnp.zeros((cfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}}


def line_logits(
    params: dict, tokens_BT: Int[Array, "B T"], ends_BL: Int[Array, "B L"], cfg: lm.LMConfig
) -> Float[Array, "B L"]:
    """Head logits at each line's closing newline (rows of `ends_BL` past a trace's lines read position 0)."""
    h_BTD = lm.forward(params["lm"], tokens_BT, cfg, capture=("final_norm",)).captured["final_norm"]
    h_BLD = jnp.take_along_axis(h_BTD.astype(jnp.float32), ends_BL[:, :, None], axis=1)
    return h_BLD @ params["head"]["w"] + params["head"]["b"]


@functools.partial(jax.jit, static_argnames="cfg")
def _probs(params, tokens_BT, ends_BL, cfg):
    return jax.nn.sigmoid(line_logits(params, tokens_BT, ends_BL, cfg))


def loss_fn(params, batch, cfg: lm.LMConfig, freeze_lm: bool = False):
    """Masked BCE over labelled lines: (loss, {"accuracy"}) with soft labels allowed."""
    if freeze_lm:
        params = {"lm": jax.lax.stop_gradient(params["lm"]), "head": params["head"]}
    logits_BL = line_logits(params, batch["tokens"], batch["ends"], cfg)
    mask_BL = batch["mask"]
    n = jnp.maximum(jnp.sum(mask_BL), 1.0)
    loss = jnp.sum(optax.sigmoid_binary_cross_entropy(logits_BL, batch["labels"]) * mask_BL) / n
    acc = jnp.sum(((logits_BL > 0) == (batch["labels"] >= 0.5)) * mask_BL) / n
    return loss, {"accuracy": acc}


@functools.lru_cache(maxsize=16)
def _train_step(cfg: lm.LMConfig, steps: int, lr: float, warmup_steps: int, weight_decay: float, freeze_lm: bool):
    """(optimizer, jitted step), cached so verifiers fitted with the same settings share one compile."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, steps - 1), steps, lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))

    @jax.jit
    def step(params, opt_state, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, cfg, freeze_lm)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux["accuracy"]

    return tx, step


class FitHistory(NamedTuple):
    """Loss and line accuracy every `log_every` steps (the mean over those steps)."""

    steps: list[int]
    loss: list[float]
    accuracy: list[float]


def fit(
    params: dict,
    cfg: lm.LMConfig | Mapping[str, Any],
    problems: Sequence[arithmetic.Problem],
    completions: Sequence[str],
    line_labels: Sequence[np.ndarray],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    freeze_lm: bool = False,
    seed: int = 0,
    log_every: int = 50,
) -> tuple[dict, FitHistory]:
    """Trains the verifier on traces with per-line labels (NaN = unlabelled) by masked BCE; returns (params, history).

    Batches are drawn uniformly from the traces with a numpy Generator seeded by `seed`.
    """
    cfg = lm.LMConfig.from_config(cfg)
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"verifiers.fit: {name} must be an int >= 1, got {v!r}")
    if not (len(problems) == len(completions) == len(line_labels)) or not len(problems):
        raise ValueError(
            f"verifiers.fit: need as many problems ({len(problems)}), completions ({len(completions)}) and label "
            f"vectors ({len(line_labels)}), at least one"
        )
    # Bucketed padding: fits on different trace sets (label sources) reuse one compiled step.
    longest = max(len(data.encode_prompt(p)) + len(c) for p, c in zip(problems, completions))
    most = max(len(traces.split_lines(c)) for c in completions)
    if longest > cfg.max_seq_len:
        raise ValueError(f"verifiers.fit: traces of {longest} tokens exceed model.max_seq_len={cfg.max_seq_len}")
    enc = traces.encode_traces(
        problems,
        completions,
        seq_len=bucket_length(longest, cfg.max_seq_len),
        max_lines=max(most, 1) + (-max(most, 1)) % 8,
    )
    for t, (lab, m) in enumerate(zip(line_labels, enc.line_mask)):
        if len(lab) != int(m.sum()):
            raise ValueError(f"verifiers.fit: trace {t} has {int(m.sum())} finished lines but {len(lab)} labels")
    labels, mask = traces.pad_labels(line_labels, enc.ends.shape[1])
    if not mask.any():
        raise ValueError("verifiers.fit: no line carries a label")
    tx, step = _train_step(cfg, steps, float(lr), int(warmup_steps), float(weight_decay), bool(freeze_lm))
    opt_state = tx.init(params)

    rng = np.random.default_rng(seed)
    hist = FitHistory([], [], [])
    acc_l, acc_a = [], []
    for i in range(steps):
        idx = rng.integers(0, len(problems), size=batch_size)
        batch = {"tokens": enc.tokens[idx], "ends": enc.ends[idx], "labels": labels[idx], "mask": mask[idx]}
        params, opt_state, loss, acc = step(params, opt_state, batch)
        acc_l.append(loss)
        acc_a.append(acc)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            hist.steps.append(i + 1)
            hist.loss.append(float(np.mean(jax.device_get(acc_l))))
            hist.accuracy.append(float(np.mean(jax.device_get(acc_a))))
            acc_l, acc_a = [], []
    return params, hist


class Scores(NamedTuple):
    """Per-trace line scores (probability the trace is still right after each finished line), tokens read per trace."""

    scores: list[np.ndarray]
    tokens: np.ndarray


class Verifier:
    """A trained ORM/PRM as a search scorer: `score(problems, completions) -> Scores`, batched and bucketed."""

    def __init__(
        self, params: dict, cfg: lm.LMConfig | Mapping[str, Any], *, batch_size: int = 256, min_batch: int = 8
    ):
        self.params, self.cfg, self.batch_size = params, lm.LMConfig.from_config(cfg), int(batch_size)
        self.min_batch = min(int(min_batch), self.batch_size)  # batches are padded to a power of two >= this

    @property
    def num_params(self) -> int:
        """Parameters read per scored token (LM + head): the N in 2·N FLOPs per token."""
        return lm.param_count(self.cfg) + self.cfg.d_model + 1

    def score(self, problems: Sequence[arithmetic.Problem], completions: Sequence[str]) -> Scores:
        """One score per finished line of every completion, in chunks of `batch_size` traces."""
        out: list[np.ndarray] = []
        tokens = np.zeros(len(problems), np.int64)
        for lo in range(0, len(problems), self.batch_size):
            ps, cs = problems[lo : lo + self.batch_size], completions[lo : lo + self.batch_size]
            enc = traces.encode_traces(ps, cs)
            B, T, L = len(ps), enc.tokens.shape[1], enc.ends.shape[1]
            if T > self.cfg.max_seq_len:
                raise ValueError(f"Verifier.score: a trace of {T} tokens exceeds model.max_seq_len")
            # Bucketed shapes: a search scores ever-longer prefixes in ever-different batch sizes.
            Bp, Tp, Lp = (
                bucket_length(B, 1 << 20, minimum=self.min_batch),
                bucket_length(T, self.cfg.max_seq_len),
                L + (-L) % 8,
            )
            tok_BT = np.zeros((Bp, Tp), np.int32)
            tok_BT[:B, :T] = enc.tokens
            ends_BL = np.zeros((Bp, Lp), np.int32)
            ends_BL[:B, :L] = enc.ends
            probs = np.asarray(_probs(self.params, tok_BT, ends_BL, self.cfg))
            n_lines = enc.line_mask.sum(axis=1).astype(int)
            out += [probs[b, : n_lines[b]].astype(np.float64) for b in range(B)]
            tokens[lo : lo + B] = enc.lengths
        return Scores(out, tokens)


def save(path: str | pathlib.Path, params: dict) -> None:
    """Writes verifier params to `path` (a new directory, orbax)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(pathlib.Path(path).absolute(), params)


def load(path: str | pathlib.Path, like: Any = None) -> dict:
    """Reads params written by `save`; `like` (params or their shapes) fixes structure and dtypes."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(pathlib.Path(path).absolute(), like)
