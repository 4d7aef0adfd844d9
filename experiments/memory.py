"""Agent memory: train the LM answerer on the ledger reading task, then the study over stores and history lengths.

Artifacts in `workdir`: config.json, metrics.jsonl, checkpoints/ (the answerer, trained through the one loop),
stores/*.db (one SQLite file per store, seed and length), results/memory_study.json, figures/memory_<reader>.png.

The study: for each seed and history length, a ledger (`harness.make_ledger`) is written into a fresh file of every
store; each question retrieves k items, filled by rank into at most `task.budget` tokens (the answerer's window),
and the readers answer from the same contexts: the deterministic `rule` reader (what the context supports, exactly)
and the trained LM answerer (`lm`: greedy; `lm_scored`: the scored decoding rule; `study.decisions`). The
pseudo-store `gold` gives each question the lines a perfect retriever would (`harness.gold_context`): the readers'
ceiling. A store named with "+time" (`gold+time`, `vector+time`, `temporal+time`) asks its "as of day d" questions
time-aware (`harness.time_filter`: the temporal store's facts valid at d, an utterance store's lines up to day d).
With `train.steps = 0` (or `study.lm_reader = False`) only the rule reader runs.

Training the answerer: packed rows of reading examples (`train.pack`; up to `task.questions` questions per context,
a share `task.easy` of plain lookups), the loss with weight 1 on the answers (`answerer.answer_mask`) and
`task.context_weight` on the rest of the dialogue; the held-out eval scores the answer of one-question examples.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from configs.memory import answerer as answerer_config
from framework import config as config_lib
from framework import memory
from framework.memory import answerer, harness, reading
from framework.models import lm
from framework.tasks import data
from framework.tasks.tokenizer import TEXT_VOCAB_SIZE
from framework.training import loop
from framework.training.loss import held_out_eval, lm_loss_fn

log = logging.getLogger(__name__)


def validate(config: ml_collections.ConfigDict) -> lm.LMConfig:
    """Checks keys, types and combinations of a memory config; returns the answerer's model config."""
    config_lib.check_against(config, answerer_config.get_config())
    req = config_lib.require
    try:
        model_cfg = lm.LMConfig.from_config(config.model)
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(str(e)) from None
    req(
        model_cfg.tokenizer == "text",
        "model.tokenizer",
        f"must be 'text' (the dialogue format), got {model_cfg.tokenizer!r}",
    )
    req(
        model_cfg.vocab_size == TEXT_VOCAB_SIZE,
        "model.vocab_size",
        f"must be {TEXT_VOCAB_SIZE}, got {model_cfg.vocab_size}",
    )
    t, tc, st = config.task, config.train, config.study
    req(t.budget > 0, "task.budget", f"must be positive, got {t.budget}")
    req(
        0.0 <= t.context_weight <= 1.0,
        "task.context_weight",
        f"must be in [0, 1] (the loss weight of the dialogue before the answer), got {t.context_weight}",
    )
    req(
        1 <= t.min_events <= t.max_events,
        "task.min_events",
        f"need 1 <= min_events <= max_events, got {t.min_events}, {t.max_events}",
    )
    need = reading.reading_source(t.budget).max_tokens
    req(
        tc.seq_len >= need,
        "train.seq_len",
        f"{tc.seq_len} < the longest example ({need} tokens at task.budget = {t.budget})",
    )
    req(tc.seq_len <= model_cfg.max_seq_len, "train.seq_len", f"{tc.seq_len} exceeds model.max_seq_len")
    req(
        tc.steps >= 0 and tc.batch_size > 0,
        "train.steps",
        f"need steps >= 0 and batch_size > 0, got {tc.steps}, {tc.batch_size}",
    )
    req(
        all(int(n) > 0 for n in st.lengths) and len(st.lengths) > 0,
        "study.lengths",
        f"{st.lengths}: expected positive history lengths",
    )
    plain = set(memory.STORES) | {"vector_lm", "gold"}
    timed = {f"{s}{TIME_AWARE}" for s in plain if s == "gold" or _store_class(s).time_query is not None}
    unknown = sorted(set(st.stores) - plain - timed)
    req(
        not unknown,
        "study.stores",
        f"unknown stores {unknown}; expected some of {sorted(plain)}, or one of {sorted(timed)} (time-aware)",
    )
    req(
        len(st.decisions) > 0 and set(st.decisions) <= set(answerer.DECISIONS),
        "study.decisions",
        f"{st.decisions!r}: expected some of {answerer.DECISIONS} (the LM reader's decoding rules)",
    )
    req(0.0 <= t.easy <= 1.0, "task.easy", f"must be in [0, 1] (the share of plain lookups), got {t.easy}")
    req(t.max_vars >= 1, "task.max_vars", f"must be >= 1 (variables in a plain lookup), got {t.max_vars}")
    req(0.0 <= t.near <= 1.0, "task.near", f"must be in [0, 1] (the share among near-namesakes), got {t.near}")
    req(t.questions >= 1, "task.questions", f"must be >= 1 (questions per training context), got {t.questions}")
    req(
        len(t.curriculum_steps) == 2 and 0 <= t.curriculum_steps[0] <= t.curriculum_steps[1],
        "task.curriculum_steps",
        f"{t.curriculum_steps}: expected (a, b) with 0 <= a <= b (steps of one-variable, then plain lookups)",
    )
    req(
        st.k > 0 and st.questions_per_ability > 0,
        "study.k",
        f"need k > 0 and questions_per_ability > 0, got {st.k}, {st.questions_per_ability}",
    )
    return model_cfg


def make_task(config: ml_collections.ConfigDict) -> tuple[lm.LMConfig, loop.Task]:
    """The answerer's model config and its `loop.Task` (init, loss, reading batches, held-out eval)."""
    model_cfg = validate(config)
    t, tc = config.task, config.train
    stages = reading.curriculum_indices(t.curriculum_steps, tc.batch_size, tc.seq_len, tc.pack)
    events = (t.min_events, t.max_events)
    source = reading.reading_source(t.budget, events, t.questions, t.easy, stages, t.max_vars, t.near)
    one = reading.reading_source(t.budget, events, 1, t.easy, near=t.near)  # eval: the answer only

    def ds(split, rows=None, num_batches=None, loss_on="completion", pack=False):
        return data.make_text_dataset(
            source if split == "train" else one,
            "text",
            seed=config.seed,
            batch_size=tc.batch_size,
            seq_len=tc.seq_len,
            split=split,
            rows=rows,
            num_batches=num_batches,
            loss_on=loss_on,
            pack=pack,
        )

    w = float(t.context_weight)
    keys = ("tokens", "loss_mask") + (("positions", "segment_ids") if tc.pack else ())

    def weighted(b):
        """The answer at weight 1 and (with task.context_weight > 0) the rest of the dialogue at that weight."""
        b = {k: b[k] for k in keys}
        if w > 0:
            ans = answerer.answer_mask(b["tokens"], b.get("segment_ids"))
            b["loss_mask"] = b["loss_mask"] * (w + (1.0 - w) * ans)
        return b

    loss_fn = lm_loss_fn(model_cfg)
    eval_batches = [{k: np.asarray(b[k]) for k in ("tokens", "loss_mask")} for b in ds("eval", num_batches=2)]
    held_out, probes = held_out_eval(loss_fn, eval_batches), answerer.lookup_probe_examples()
    fits = max(tokens_BT.shape[1] for tokens_BT, _, _ in probes.values()) <= model_cfg.max_seq_len
    probe = answerer.lookup_probe(model_cfg, probes) if fits else None  # a window too short for 3 lines: no probe

    def eval_fn(state):  # the held-out answers' loss, and whether the answerer matches names (eval/lookup_p_*)
        return {**held_out(state), **(probe(state.params) if probe else {})}

    task = loop.Task(
        init_params=lambda rng: lm.init(model_cfg, rng),
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=loss_fn,
        batches=lambda start, rows=None: (
            weighted(b)
            for b in data.batch_iterator(
                ds("train", rows, loss_on="all" if w > 0 else "completion", pack=tc.pack), start
            )
        ),
        flops_per_example=lm.flops_per_token(model_cfg, tc.seq_len) * tc.seq_len,
        eval_fn=eval_fn,
    )
    return model_cfg, task


TIME_AWARE = "+time"  # a study store name's suffix: "as of day d" questions retrieve with `harness.time_filter`


def _store_class(kind: str):
    return memory.VectorStore if kind == "vector_lm" else memory.STORES[kind]


def _open_store(kind: str, path: str, embedder=None, budget: int = 96):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)  # every cell of the study starts from an empty file
    if kind == "vector_lm":
        return memory.VectorStore(path, embedder=embedder)
    if kind == "core_archival":  # MemGPT sizes the core block to the window: a third of it, the rest for archival
        return memory.CoreArchivalStore(path, core_chars=budget // 3)
    return memory.STORES[kind](path)


def study_contexts(kind: str, ledger, path: str, *, budget: int, k: int, embedder=None) -> list:
    """[(question, context lines)] for every question of `ledger`: written into a fresh store of `kind` at `path`
    and retrieved, or for the pseudo-store "gold" the lines a perfect retriever would bring (the readers' ceiling).
    A kind ending in "+time" ("temporal+time") asks "as of day d" questions time-aware (`harness.time_filter`)."""
    kind, time_aware = kind.removesuffix(TIME_AWARE), kind.endswith(TIME_AWARE)
    if kind == "gold":
        return [(q.text, harness.gold_context(ledger, q, budget, time_aware=time_aware)) for q in ledger.questions]
    with _open_store(kind, path, embedder, budget) as store:
        return harness.ask(store, ledger, k=k, budget=budget, time_aware=time_aware)


def run_study(study: ml_collections.ConfigDict, workdir: str, *, budget: int, readers: dict, embedder=None) -> list:
    """Every (seed, length, store) cell: write the ledger, ask, score each reader; returns one row per cell/reader."""
    rows = []
    os.makedirs(os.path.join(workdir, "stores"), exist_ok=True)
    for seed in study.seeds:
        for n in study.lengths:
            ledger = harness.make_ledger(int(seed), int(n), questions_per_ability=study.questions_per_ability)
            for kind in study.stores:
                if kind.removesuffix(TIME_AWARE) == "vector_lm" and embedder is None:
                    continue
                t0 = time.perf_counter()
                path = os.path.join(workdir, "stores", f"{kind}-n{n}-s{seed}.db")
                contexts = study_contexts(kind, ledger, path, budget=budget, k=study.k, embedder=embedder)
                seconds = time.perf_counter() - t0
                for name, reader in readers.items():
                    res = harness.score(ledger, contexts, reader)
                    rows.append(
                        dict(
                            seed=int(seed),
                            n_events=int(n),
                            store=kind,
                            reader=name,
                            seconds=seconds,
                            accuracy=res["accuracy"],
                            tokens_read=res["tokens_read"],
                            count=res["count"],
                        )
                    )
                    log.info("seed %d n %d %s %s: %s", seed, n, kind, name, res["accuracy"])
                    print(
                        f"seed {seed} n={n:5d} {kind:14s} {name:5s} all={res['accuracy']['all']:.2f} "
                        f"tokens={res['tokens_read']['all']:.0f}",
                        flush=True,
                    )
    return rows


def plot(rows: list, path: str, reader: str) -> None:
    """Accuracy per ability and tokens read against history length, one line per store (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["reader"] == reader]
    stores = list(dict.fromkeys(r["store"] for r in rs))
    panels = harness.ABILITIES + ("all", "tokens")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, panel in zip(axes, panels):
        for kind in stores:
            ns = sorted({r["n_events"] for r in rs if r["store"] == kind})
            key = "tokens_read" if panel == "tokens" else "accuracy"
            ab = "all" if panel == "tokens" else panel
            ys = [
                np.mean(
                    [r[key][ab] for r in rs if r["store"] == kind and r["n_events"] == n and r[key][ab] is not None]
                    or [np.nan]
                )
                for n in ns
            ]
            ax.plot(ns, ys, marker="o", label=kind)
        ax.set(xscale="log", title=panel, xlabel="history length (events)")
        if panel != "tokens":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"reader: {reader}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the answerer (resuming from `workdir`), runs the study, writes its JSON and figures."""
    model_cfg, task = make_task(config)
    readers = {"rule": harness.rule_reader}
    embedder = None
    if config.train.steps > 0:
        state = loop.train(config, workdir, task)
        params = jax.device_get(state.params)
        if config.study.lm_reader:
            for decision in config.study.decisions:  # "lm" (greedy), "lm_scored"
                name = "lm" if decision == "greedy" else f"lm_{decision}"
                readers[name] = answerer.LMReader(params, model_cfg, decision=decision)
        embedder = memory.LMEmbedder(params, model_cfg)
    rows = run_study(config.study, workdir, budget=config.task.budget, readers=readers, embedder=embedder)
    out = dict(config=json.loads(config_lib.to_json(config)), rows=rows)
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
        with open(os.path.join(workdir, "results", "memory_study.json"), "w") as f:
            json.dump(out, f, indent=1)
        for name in readers:
            plot(rows, os.path.join(workdir, "figures", f"memory_{name}.png"), name)
    return out
