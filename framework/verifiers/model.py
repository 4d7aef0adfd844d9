"""ORM and PRM value heads on a Lumen LM: a linear read-out of the final hidden state at each line's closing newline.

Glossary: B traces, T tokens, L lines, D model width.

params = {"lm": <framework.models.lm params>, "head": {"w": [D], "b": []}}. The score of line j is
sigmoid(w · h[ends[j]] + b), h = the `final_norm` hookpoint. A PRM is trained on every labelled line; an ORM is the
same model trained only on the last line's outcome label (`labels.outcome_labels`), so both score partial traces
the same way and plug into search as scorers. Training is masked binary cross-entropy (soft labels allowed), a `Task`
on the one training loop (`framework.training.loop`); the LM is fine-tuned with the head unless `freeze_lm`.

    v = init(policy_params, cfg, jax.random.key(0))
    v, hist = fit(v, cfg, problems, completions, line_labels, steps=300)
    scorer = Verifier(v, cfg)
    scorer.score(problems, completions).scores          # one float array per trace, one score per finished line
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from framework import sharding
from framework.inference.generate import bucket_length
from framework.models import lm
from framework.tasks import arithmetic, data
from framework.training import loop
from framework.training.metrics import read_metrics
from framework.verifiers import traces

KINDS = ("prm", "orm")


def init(lm_params: lm.Params, cfg: lm.LMConfig | Mapping[str, Any], rng: jax.Array) -> dict:
    """Verifier params: the LM's (usually the policy's, as a warm start) plus a zero-initialised head."""
    del rng  # a zero head starts every line at p = 0.5 whatever the hidden state: no draw needed
    cfg = lm.LMConfig.from_config(cfg)
    return {"lm": lm_params, "head": {"w": jnp.zeros((cfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}}


def line_logits(
    params: dict,
    tokens_BT: Int[Array, "B T"],
    ends_BL: Int[Array, "B L"],
    cfg: lm.LMConfig,
    positions_BT: Int[Array, "B T"] | None = None,
    segment_ids_BT: Int[Array, "B T"] | None = None,
) -> Float[Array, "B L"]:
    """Head logits at each line's closing newline (rows of `ends_BL` past a trace's lines read position 0).

    Packed rows (several traces end to end, `pack_rows`) pass per-trace positions and segment ids.
    """
    h_BTD = lm.forward(
        params["lm"], tokens_BT, cfg, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, capture=("final_norm",)
    ).captured["final_norm"]
    h_BLD = jnp.take_along_axis(h_BTD.astype(jnp.float32), ends_BL[:, :, None], axis=1)
    return h_BLD @ params["head"]["w"] + params["head"]["b"]


@functools.partial(jax.jit, static_argnames="cfg")
def _probs(params, tokens_BT, ends_BL, cfg):
    return jax.nn.sigmoid(line_logits(params, tokens_BT, ends_BL, cfg))


def loss_fn(params, batch, cfg: lm.LMConfig, freeze_lm: bool = False):
    """Masked BCE over labelled lines: (loss, {"accuracy"}) with soft labels allowed."""
    if freeze_lm:
        params = {"lm": jax.lax.stop_gradient(params["lm"]), "head": params["head"]}
    logits_BL = line_logits(
        params, batch["tokens"], batch["ends"], cfg, batch.get("positions"), batch.get("segment_ids")
    )
    mask_BL = batch["mask"]
    n = jnp.maximum(jnp.sum(mask_BL), 1.0)
    loss = jnp.sum(optax.sigmoid_binary_cross_entropy(logits_BL, batch["labels"]) * mask_BL) / n
    acc = jnp.sum(((logits_BL > 0) == (batch["labels"] >= 0.5)) * mask_BL) / n
    return loss, {"accuracy": acc}


@functools.lru_cache(maxsize=16)
def _optimizer(steps: int, lr: float, warmup_steps: int, weight_decay: float):
    """(optimizer, schedule): AdamW after a unit gradient clip, warm-up then cosine decay to lr/10. Cached, so
    verifiers fitted with the same settings share one compiled train step."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, steps - 1), steps, lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay)), schedule


@functools.lru_cache(maxsize=16)
def _loss(cfg: lm.LMConfig):
    return functools.partial(loss_fn, cfg=cfg)


class FitHistory(NamedTuple):
    """Loss and line accuracy every `log_every` steps (the mean over those steps)."""

    steps: list[int]
    loss: list[float]
    accuracy: list[float]


class PackedBatch(NamedTuple):
    """Traces laid end to end in rows of one length: tokens/positions/segment ids [R, T], ends/labels/mask [R, L]."""

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    ends: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def _first_fit(lengths: np.ndarray, idx: np.ndarray, seq_len: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in idx:
        n = int(lengths[i])
        r = next((r for r, left in enumerate(room) if left >= n), None)
        if r is None:
            rows.append([])
            room.append(seq_len)
            r = len(rows) - 1
        rows[r].append(int(i))
        room[r] -= n
    return rows


def pack_rows(
    enc: traces.EncodedTraces,
    labels: np.ndarray,
    mask: np.ndarray,
    batches: Sequence[np.ndarray],
    *,
    seq_len: int,
) -> list[PackedBatch]:
    """Packs each batch of trace indices into rows of `seq_len` tokens (first fit, in index order), every batch
    to the same [R, T] / [R, L] shape (the most rows and lines any batch needs, rounded up) so one compile
    serves them all. Each trace keeps its own positions 0.. and segment id, so the LM reads it as if alone.
    """
    lengths = enc.lengths
    if int(lengths.max()) > seq_len:
        raise ValueError(f"pack_rows: a trace of {int(lengths.max())} tokens exceeds seq_len={seq_len}")
    n_lines = enc.line_mask.sum(axis=1).astype(int)
    layouts = [_first_fit(lengths, np.asarray(b), seq_len) for b in batches]
    # Rows rounded up to 8 and lines to 16: fits on other trace sets (label sources) mostly share the compile.
    R = max(len(rows) for rows in layouts)
    R += -R % 8
    L = max(max(sum(int(n_lines[i]) for i in row) for rows in layouts for row in rows), 1)
    L += -L % 16
    out = []
    for rows in layouts:
        tok = np.zeros((R, seq_len), np.int32)
        pos, seg = np.zeros((R, seq_len), np.int32), np.zeros((R, seq_len), np.int32)
        ends, lab, msk = np.zeros((R, L), np.int32), np.zeros((R, L), np.float32), np.zeros((R, L), np.float32)
        for r, row in enumerate(rows):
            t = l = 0
            for j, i in enumerate(row):
                n, k = int(lengths[i]), int(n_lines[i])
                tok[r, t : t + n] = enc.tokens[i, :n]
                pos[r, t : t + n] = np.arange(n)
                seg[r, t : t + n] = j + 1
                ends[r, l : l + k] = enc.ends[i, :k] + t
                lab[r, l : l + k] = labels[i, :k]
                msk[r, l : l + k] = mask[i, :k]
                t, l = t + n, l + k
        out.append(PackedBatch(tok, pos, seg, ends, lab, msk))
    return out


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
    pack: bool = True,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[dict, FitHistory]:
    """Trains the verifier on traces with per-line labels (NaN = unlabelled) by masked BCE; returns (params, history).

    Batches are drawn uniformly from the traces with a numpy Generator seeded by `seed`. `pack=True` lays each
    batch's traces end to end in rows (`pack_rows`, segment-masked attention): the same loss on the same traces as
    one padded row per trace, for fewer tokens (the arithmetic traces average about a third of the padded length).

    Training is a `framework.training.loop.Task` on the one loop: AdamW (`weight_decay` on every param) after a unit
    gradient clip, linear warm-up to `lr` then cosine decay to lr/10; `freeze_lm` freezes the LM by the config
    regex `train.frozen = ("lm/.*",)` (no gradient, update or decay; only the head trains). A non-finite loss stops
    the fit with FloatingPointError. `checkpoint_dir` is the loop's workdir (config.json, metrics.jsonl, TensorBoard,
    checkpoints every `checkpoint_every` steps, default only the last): rerunning the same fit there resumes, and a
    finished one returns at once. Without it the fit runs in a temporary directory. `devices` (default: this
    process's first device) are the devices the batch is split over.
    """
    cfg = lm.LMConfig.from_config(cfg)
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"verifiers.fit: {name} must be an int >= 1, got {v!r}")
    ck = checkpoint_every
    if ck is not None and (isinstance(ck, bool) or not isinstance(ck, int) or ck < 1):
        raise ValueError(f"verifiers.fit: checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")
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
    seq_len = bucket_length(longest, cfg.max_seq_len)
    enc = traces.encode_traces(problems, completions, seq_len=seq_len, max_lines=max(most, 1) + (-max(most, 1)) % 8)
    for t, (lab, m) in enumerate(zip(line_labels, enc.line_mask)):
        if len(lab) != int(m.sum()):
            raise ValueError(f"verifiers.fit: trace {t} has {int(m.sum())} finished lines but {len(lab)} labels")
    labels, mask = traces.pad_labels(line_labels, enc.ends.shape[1])
    if not mask.any():
        raise ValueError("verifiers.fit: no line carries a label")

    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(problems), size=batch_size) for _ in range(steps)]
    if pack:
        packed = pack_rows(enc, labels, mask, draws, seq_len=seq_len)
        batches = [dict(b._asdict()) for b in packed]
    else:
        batches = [{"tokens": enc.tokens[i], "ends": enc.ends[i], "labels": labels[i], "mask": mask[i]} for i in draws]
    tx, schedule = _optimizer(steps, float(lr), int(warmup_steps), float(weight_decay))
    task = loop.Task(
        init_params=lambda rng: params,
        logical_axes=_logical_axes(params, cfg),
        loss_fn=_loss(cfg),
        batches=functools.partial(_rows, batches),
        optimizer=tx,
        lr_schedule=schedule,
    )
    history = _History(log_every)
    train = dict(
        steps=steps,
        batch_size=len(batches[0]["tokens"]),  # rows (packed: several traces each)
        seq_len=seq_len,
        lr=float(lr),
        warmup_steps=int(warmup_steps),
        weight_decay=float(weight_decay),
        frozen=("lm/.*",) if freeze_lm else (),
        log_every=log_every,
        checkpoint_every=checkpoint_every or steps,
    )
    data_cfg = dict(digest=_digest(enc.tokens, labels, mask), traces_per_batch=batch_size, pack=pack)
    config = _fit_config(seed, data_cfg, train)
    with contextlib.ExitStack() as stack:
        workdir = checkpoint_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="verifier_fit_"))
        state = loop.train(config, workdir, task, devices=devices or jax.local_devices()[:1], hooks=(history,))
        return state.params, history.result(workdir)


def _rows(batches: list[dict], start: int, rows: tuple[int, int] | None = None):
    """Batches `start`.. (only rows lo..hi-1 of each under several processes, as the loop asks)."""
    for b in batches[start:]:
        yield b if rows is None else {k: v[rows[0] : rows[1]] for k, v in b.items()}


class _History:
    """FitHistory from every step's metrics (on every process): the mean loss and accuracy of each log window, as
    the loop logs them; a resumed fit takes the windows before it from metrics.jsonl."""

    def __init__(self, log_every: int):
        self.log_every, self.first, self.losses, self.accs = log_every, None, [], []
        self.hist = FitHistory([], [], [])

    def __call__(self, step: int, ctx) -> None:
        self.first = step if self.first is None else self.first
        self.losses.append(ctx.metrics["loss"])
        self.accs.append(ctx.metrics["accuracy"])
        if step % self.log_every == 0 or ctx.final:
            self.hist.steps.append(step)
            self.hist.loss.append(float(np.mean(jax.device_get(self.losses))))
            self.hist.accuracy.append(float(np.mean(jax.device_get(self.accs))))
            self.losses, self.accs = [], []

    def result(self, workdir: str) -> FitHistory:
        first = self.first or float("inf")
        earlier = [r for r in read_metrics(workdir) if "train/loss" in r and r["step"] < first]
        return FitHistory(
            [r["step"] for r in earlier] + self.hist.steps,
            [r["train/loss"] for r in earlier] + self.hist.loss,
            [r["train/accuracy"] for r in earlier] + self.hist.accuracy,
        )


def _logical_axes(params: dict, cfg: lm.LMConfig):
    """The LM's logical axes (FSDP/TP meshes shard it) when `params["lm"]` has lm.init's layout, else replicated."""
    lm_axes = lm.logical_axes(cfg)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    if jax.tree.structure(lm_axes, is_leaf=is_spec) != jax.tree.structure(params["lm"]):
        lm_axes = jax.tree.map(lambda _: P(), params["lm"])
    return {"lm": lm_axes, "head": {"w": P("embed"), "b": P()}}


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _fit_config(seed: int, data_cfg: dict, train: dict) -> ml_collections.ConfigDict:
    """The loop's config of a fit (`train` over these defaults): the optimiser's settings as `_optimizer` builds it
    and what the batches are drawn from (for config.json and the resume digest), no eval, no progress bar."""
    defaults = dict(
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.999,
        grad_clip=1.0,
        eval_every=0,
        stop_when="",
        keep_checkpoints=2,
        keep_checkpoint_every=0,
        async_checkpoint=True,
        nonfinite="stop",
        peak_flops=None,
        progress=False,
    )
    mesh = dict(data=-1, fsdp=1, tensor=1)
    return ml_collections.ConfigDict(
        dict(experiment="verifier_fit", seed=seed, data=data_cfg, train=defaults | train, mesh=mesh)
    )


class Scores(NamedTuple):
    """Per-trace line scores (probability the trace is still right after each finished line), tokens read per trace."""

    scores: list[np.ndarray]
    tokens: np.ndarray


class Verifier:
    """A trained ORM/PRM as a search scorer: `score(problems, completions) -> Scores`, batched and bucketed.

    Traces are scored in chunks of `batch_size` in order of length, so a chunk pads to about its own length. Given a
    `mesh`, the parameters are replicated on it and each chunk is split over its batch axes (`sharding.put_batch`).
    """

    def __init__(
        self,
        params: dict,
        cfg: lm.LMConfig | Mapping[str, Any],
        *,
        batch_size: int = 256,
        min_batch: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        rules=sharding.DEFAULT_RULES,
    ):
        self.params, self.cfg, self.batch_size = params, lm.LMConfig.from_config(cfg), int(batch_size)
        self.min_batch = min(int(min_batch), self.batch_size)  # batches are padded to a power of two >= this
        self.mesh, self.rules = mesh, rules
        if mesh is not None:
            self.params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            axes = dict(rules)["batch"]
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            self.shards = int(np.prod([mesh.shape[x] for x in axes])) if axes else 1
        else:
            self.shards = 1

    @property
    def num_params(self) -> int:
        """Parameters of the LM and its value head (FLOPs go through `lm.flops` of `self.cfg`)."""
        return lm.param_count(self.cfg) + self.cfg.d_model + 1

    def score(self, problems: Sequence[arithmetic.Problem], completions: Sequence[str]) -> Scores:
        """One score per finished line of every completion, in chunks of `batch_size` traces."""
        if len(problems) != len(completions):
            raise ValueError(f"Verifier.score: {len(problems)} problems but {len(completions)} completions")
        out: list[np.ndarray] = [np.zeros(0)] * len(problems)
        tokens = np.zeros(len(problems), np.int64)
        lengths = [len(data.encode_prompt(p)) + len(c) for p, c in zip(problems, completions)]
        order = np.argsort(lengths, kind="stable")
        for lo in range(0, len(problems), self.batch_size):
            rows = order[lo : lo + self.batch_size]
            enc = traces.encode_traces([problems[i] for i in rows], [completions[i] for i in rows])
            B, T, L = len(rows), enc.tokens.shape[1], enc.ends.shape[1]
            if T > self.cfg.max_seq_len:
                raise ValueError(f"Verifier.score: a trace of {T} tokens exceeds model.max_seq_len")
            # Bucketed shapes: a search scores ever-longer prefixes in ever-different batch sizes.
            Bp, Tp, Lp = (
                bucket_length(B, 1 << 20, minimum=self.min_batch),
                bucket_length(T, self.cfg.max_seq_len),
                L + (-L) % 8,
            )
            Bp += -Bp % self.shards
            tok_BT = np.zeros((Bp, Tp), np.int32)
            tok_BT[:B, :T] = enc.tokens
            ends_BL = np.zeros((Bp, Lp), np.int32)
            ends_BL[:B, :L] = enc.ends
            if self.mesh is None:
                probs = np.asarray(_probs(self.params, tok_BT, ends_BL, self.cfg))
            else:
                batch = sharding.put_batch({"tokens": tok_BT, "ends": ends_BL}, self.mesh, self.rules)
                with sharding.rules_context(self.mesh, self.rules):
                    probs = np.asarray(_probs(self.params, batch["tokens"], batch["ends"], self.cfg))
            n_lines = enc.line_mask.sum(axis=1).astype(int)
            for b, i in enumerate(rows):
                out[i] = probs[b, : n_lines[b]].astype(np.float64)
            tokens[rows] = enc.lengths
        return Scores(out, tokens)


def save(path: str | pathlib.Path, params: dict) -> None:
    """Writes verifier params to `path` (a new directory, orbax)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(pathlib.Path(path).absolute(), params)


def load(path: str | pathlib.Path, like: Any = None) -> dict:
    """Reads params written by `save`; `like` (params or their shapes) fixes structure and dtypes."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(pathlib.Path(path).absolute(), like)
