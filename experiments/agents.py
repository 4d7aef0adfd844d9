"""Multi-agent topologies of Lumen LMs on the arithmetic chains: role training on the one loop, then the study.

Stage 1 trains one text-tokenizer LM on the roles' mixed stream (`formats.role_source`: solve, revise, split,
verify, assemble) with `loop.train`; a hook saves a snapshot of the params the first time the held-out token
accuracy reaches each of `config.study.budgets` (training stops at the last), so the budgets are one run's
checkpoints at measured qualities (workdir/snapshots/acc<q>.npz, reused on a rerun).

Stage 2, per snapshot: every topology of `config.study.topologies` ("single", "vote:3", "debate:3x2",
"centralised:2", "hybrid:2x1", "pipeline:2") runs on `config.study.problems` held-out chains with all agents the
snapshot's model at `config.study.temperature`, clean and with one wrong step planted; the topologies in
`config.study.tool_topologies` also run with the MCP calculator (a real server process). Every run writes its
A2A-shaped log under workdir/logs/ and a rerun replays finished runs from their logs.

Reported per run: accuracy, FLOPs per solved problem (every message's `lm.flops`), failures by name, the
error-amplification factor (the run's error rate / the single agent's at the same snapshot, seed and sampling),
injected-error propagation (of the problems the clean run solved, the fraction the planted run gets wrong), and for
debates how often an agent changed a right answer to a wrong one and back.

Artifacts: workdir/{config.json, metrics.jsonl, checkpoints/, snapshots/, logs/, results/agents.json}.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from configs.agents.common import agents_experiment as default_config
from framework import config as config_lib
from framework.agents import Agent, LMBackend, Sampling, ToolClient, Topology, formats, topologies
from framework.agents.log import MessageLog
from framework.models import lm
from framework.tasks import arithmetic, data
from framework.training import loop
from framework.training.loss import held_out_eval, lm_loss_fn

log = logging.getLogger(__name__)


def parse_topology(spec: str) -> Topology:
    """Topology from "single", "vote:3", "debate:3x2", "centralised:2", "hybrid:2x1", "pipeline:2" (or +tools)."""
    kind, _, size = spec.partition(":")
    agents, _, rounds = size.partition("x")
    try:
        return Topology(kind, agents=int(agents or 1), rounds=int(rounds or 0))
    except ValueError as e:
        raise ValueError(f"topology spec {spec!r}: {e}") from None


def validate(config: ml_collections.ConfigDict) -> lm.LMConfig:
    """Checks keys, types and values; returns the model config. Compiles nothing."""
    config_lib.check_against(config, default_config())
    try:
        model_cfg = lm.LMConfig.from_config(config.model)
        mix = role_mix(config)
        for spec in (
            tuple(config.study.topologies) + tuple(config.study.tool_topologies) + tuple(config.study.debate_grid)
        ):
            parse_topology(spec)
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(str(e)) from None
    req = config_lib.require
    req(model_cfg.tokenizer == "text", "model.tokenizer", f"agents read 'text', got {model_cfg.tokenizer!r}")
    need = formats.role_source(mix).max_tokens
    req(config.train.seq_len >= need, "train.seq_len", f"{config.train.seq_len} < the longest role example ({need})")
    req(config.model.max_seq_len >= config.train.seq_len, "model.max_seq_len", "must be >= train.seq_len")
    b = tuple(config.study.budgets)
    req(
        len(b) > 0 and all(0 < x <= 1 for x in b) and list(b) == sorted(b),
        "study.budgets",
        f"{b!r}: expected increasing token accuracies in (0, 1]",
    )
    req(config.study.problems >= 1, "study.problems", f"{config.study.problems}; expected >= 1")
    req(config.train.eval_every > 0, "train.eval_every", "budgets are read at evaluations: expected > 0")
    return model_cfg


def role_mix(config) -> formats.RoleMix:
    """The roles' training mix from `config.roles`."""
    r = config.roles
    return formats.RoleMix(tuple(r.weights), tuple(r.num_steps), r.modulus, r.piece_steps, tuple(r.peers))


def make_role_task(config) -> tuple[lm.LMConfig, loop.Task]:
    """The model config and the `loop.Task` that trains the roles (held-out token accuracy as its eval)."""
    model_cfg = validate(config)
    tc, src = config.train, formats.role_source(role_mix(config))

    def dataset(split, rows=None, num_batches=None):
        return data.make_text_dataset(
            src,
            "text",
            seed=config.seed,
            batch_size=tc.batch_size,
            seq_len=tc.seq_len,
            split=split,
            rows=rows,
            num_batches=num_batches,
        )

    loss_fn = lm_loss_fn(model_cfg)
    eval_batches = [{k: np.asarray(b[k]) for k in ("tokens", "loss_mask")} for b in dataset("eval", num_batches=4)]
    eval_fn = held_out_eval(loss_fn, eval_batches)
    task = loop.Task(
        init_params=lambda rng: lm.init(model_cfg, rng),
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=loss_fn,
        batches=lambda start, rows=None: (
            {k: b[k] for k in ("tokens", "loss_mask")} for b in data.batch_iterator(dataset("train", rows), start)
        ),
        flops_per_example=lm.flops_per_token(model_cfg, tc.seq_len) * tc.seq_len,
        eval_fn=eval_fn,
    )
    return model_cfg, task


def _snapshot_path(workdir: str, q: float) -> str:
    return os.path.join(workdir, "snapshots", f"acc{q:g}.npz")


def _save(path: str, params, step: int, acc: float) -> None:
    leaves = jax.tree_util.tree_leaves(jax.device_get(params))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", step=step, token_accuracy=acc, **{f"p{i}": x for i, x in enumerate(leaves)})
    os.replace(path + ".tmp.npz", path)


def _load(path: str, model_cfg) -> tuple[object, dict]:
    with np.load(path) as f:
        abstract = jax.eval_shape(lambda: lm.init(model_cfg, jax.random.key(0)))
        treedef = jax.tree_util.tree_structure(abstract)
        leaves = [f[f"p{i}"] for i in range(treedef.num_leaves)]
        return jax.tree_util.tree_unflatten(treedef, leaves), {
            "step": int(f["step"]),
            "token_accuracy": float(f["token_accuracy"]),
        }


def train_roles(config, workdir: str) -> tuple[lm.LMConfig, dict[float, tuple[object, dict]]]:
    """Trains the role model (resuming), snapshotting at each budget; {budget: (params, info)}."""
    model_cfg, task = make_role_task(config)
    budgets = tuple(config.study.budgets)

    def snapshot(step, ctx):
        if ctx.evaluated is None:
            return
        acc = float(ctx.evaluated["token_accuracy"])
        for q in budgets:
            if acc >= q and not os.path.exists(_snapshot_path(workdir, q)) and jax.process_index() == 0:
                _save(_snapshot_path(workdir, q), ctx.state.params, step, acc)
        if acc >= budgets[-1]:
            ctx.stop = f"token_accuracy {acc:.4f} >= the last budget {budgets[-1]}"

    if not all(os.path.exists(_snapshot_path(workdir, q)) for q in budgets):
        state = loop.train(config, workdir, task, hooks=(snapshot,))
        for q in budgets:  # budgets never reached: the final params stand in, marked as such
            if not os.path.exists(_snapshot_path(workdir, q)):
                _save(_snapshot_path(workdir, q), state.params, int(state.step), -1.0)
    return model_cfg, {q: _load(_snapshot_path(workdir, q), model_cfg) for q in budgets}


def _problems(config, seed: int) -> list[arithmetic.Problem]:
    s = config.study
    return arithmetic.sample_problems(
        data.split_seed(seed, "test"), s.problems, num_steps=tuple(s.num_steps), modulus=config.roles.modulus
    )


def _one(topo, problems, backend, path, tools=None, plant=False) -> dict:
    log_ = MessageLog(path)
    try:
        res = topologies.run(topo, problems, backend, log=log_, tools=tools, plant=plant)
    finally:
        log_.close()
    out = res.summary()
    del out["answers"]
    out["flops_per_solved"] = res.flops_per_solved
    out["generate_calls"] = res.generate_calls
    return out


def evaluate_snapshot(config, model_cfg, params, *, seed: int, tag: str, workdir: str, tools=None) -> dict:
    """Every topology (clean, planted, with tools) on held-out problems with agents made of `params`."""
    s = config.study
    problems = _problems(config, seed)
    sampled = Sampling(temperature=float(s.temperature))
    n_max = max(parse_topology(x).num_agents for x in tuple(s.topologies) + tuple(s.debate_grid))
    backend = LMBackend([Agent(params, model_cfg, sampled, f"agent{i}") for i in range(n_max)], seed=seed)
    greedy = LMBackend([Agent(params, model_cfg, Sampling(), "greedy")], seed=seed)
    logdir = os.path.join(workdir, "logs", tag)
    rows = {"single_greedy": _one(Topology("single"), problems, greedy, os.path.join(logdir, "single_greedy.jsonl"))}
    specs = list(dict.fromkeys(tuple(s.topologies) + tuple(s.debate_grid)))
    for spec in specs:
        topo = parse_topology(spec)
        rows[spec] = _one(topo, problems, backend, os.path.join(logdir, f"{spec}.jsonl"))
        if s.plant and spec in s.topologies:
            planted = _one(topo, problems, backend, os.path.join(logdir, f"{spec}+plant.jsonl"), plant=True)
            clean_ok = np.asarray(rows[spec]["correct"])
            planted_ok = np.asarray(planted["correct"])
            rows[spec]["propagation"] = float(np.mean(~planted_ok[clean_ok])) if clean_ok.any() else float("nan")
            rows[spec]["planted_accuracy"] = planted["accuracy"]
    if tools is not None:
        for spec in s.tool_topologies:
            t = parse_topology(spec)
            topo = Topology(t.kind, agents=t.agents, rounds=t.rounds, tools=True)
            rows[spec + "+tools"] = _one(topo, problems, backend, os.path.join(logdir, f"{spec}+tools.jsonl"), tools)
    base_err = 1.0 - rows["single"]["accuracy"] if "single" in rows else float("nan")
    for row in rows.values():
        row["error_rate"] = 1.0 - row["accuracy"]
        row["amplification"] = row["error_rate"] / base_err if base_err > 0 else float("nan")
        del row["correct"]
    return rows


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the roles (resuming), runs the study per budget snapshot, writes results/agents.json; returns it."""
    model_cfg, snaps = train_roles(config, workdir)
    results = {"seed": config.seed, "budgets": {}}
    use_tools = len(config.study.tool_topologies) > 0
    client = ToolClient() if use_tools else None
    try:
        for q, (params, info) in snaps.items():
            tag = f"seed{config.seed}_acc{q:g}"
            rows = evaluate_snapshot(
                config, model_cfg, params, seed=config.seed, tag=tag, workdir=workdir, tools=client
            )
            results["budgets"][f"{q:g}"] = {"snapshot": info, "runs": rows}
            log.info("budget %s (step %d): %s", q, info["step"], {k: round(v["accuracy"], 3) for k, v in rows.items()})
    finally:
        if client is not None:
            client.close()
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
        with open(os.path.join(workdir, "results", "agents.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results
