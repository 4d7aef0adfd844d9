"""Routing study and the models behind the server: arithmetic LMs of different sizes, routers and cascades.

`build_models(config)` trains (or loads from `workdir/<name>`, or initialises at random with train_steps = 0) the
models a config names, cheapest first; `build_routers` fits routers on an outcome table of those models. Both are
shared by the study (`run`) and by `scripts/serve.py`. `build_probe` trains the small LM the hidden-state router
reads (`config.routers.probe`), which keeps its decision cheap against the smallest routed model.

Study artifacts in `workdir`: models/<name>/ (checkpoints), results/table_<mix>.npz (the outcome tables),
results/routing.json (every router's and cascade's operating points and metrics, the smallest-model share at 95% of
the largest model's accuracy per difficulty mix, each router's decision cost share, the cross-mix transfer),
figures/routing_<mix>.png (cost-accuracy plane) and figures/routing_share.png (the smallest model's share per mix).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from configs import common
from framework.models import lm
from framework.routing import calibrate, cascade, metrics, routers
from framework.routing.table import Model, OutcomeTable, build_table
from framework.tasks import arithmetic, data

log = logging.getLogger(__name__)

ROUTERS = ("mf", "knn", "hidden", "difficulty", "random", "oracle")
DIMS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")


def _train_config(mc: ml_collections.ConfigDict, task: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    cfg = common.lm_experiment(size="tiny", seed=int(mc.seed))
    cfg.model.update({k: mc[k] for k in DIMS}, max_seq_len=int(mc.max_seq_len))
    cfg.task.update(modulus=int(task.modulus), num_steps=tuple(task.num_steps))
    k_hi = arithmetic.make_knobs(num_steps=tuple(task.num_steps), modulus=int(task.modulus)).steps_range[1]
    seq = data.max_seq_len(k_hi, int(task.modulus))
    cfg.train.update(
        steps=max(int(mc.train_steps), 1),
        batch_size=int(mc.batch_size),
        seq_len=seq,
        lr=float(mc.lr),
        warmup_steps=min(100, max(int(mc.train_steps) // 10, 1)),
        checkpoint_every=max(int(mc.train_steps), 1),
        log_every=max(int(mc.train_steps) // 4, 1),
        eval_every=0,
        progress=False,
    )
    cfg.mesh.data = 1
    return cfg


def random_params(cfg: lm.LMConfig, seed: int):
    """Untrained weights of `cfg`'s shapes drawn in numpy (normal(0, init_std); norm scales 1, biases 0).

    For servers and tests that need a model of the right shape, not a trained one: it skips `lm.init`'s compile
    (seconds per model on a CPU), which matters for a test that starts a server.
    """
    shapes = jax.eval_shape(lambda k: lm.init(cfg, k), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.full(x.shape, 0.0 if cfg.norm_plus_one else 1.0, x.dtype)
        if name.endswith("['bias']"):
            return np.zeros(x.shape, x.dtype)
        return (cfg.init_std * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def build_models(config: ml_collections.ConfigDict, workdir: str | None, entries=None) -> list[Model]:
    """The config's models, cheapest first: trained into `workdir/models/<name>` (each entry of `config.models` has a
    `name`; resumed, so a second start only loads), or with untrained weights (`random_params`) when `train_steps` is
    0. `entries` replaces `config.models` (e.g. the hidden-state router's probe LM)."""
    out = []
    for mc in (config.models if entries is None else entries).values():
        name = mc.name
        tc = _train_config(mc, config.task)
        model_cfg = lm.LMConfig.from_config(tc.model)
        if int(mc.train_steps) == 0:
            params = random_params(model_cfg, int(mc.seed))
        else:
            if workdir is None:
                raise ValueError(f"model {name!r}: train_steps > 0 needs a workdir to train into")
            from experiments import train_lm  # the training stack (orbax, optax) only when something trains
            from framework.training import loop

            model_cfg, task = train_lm.make_task(tc)
            state = loop.train(tc, os.path.join(workdir, "models", name), task, devices=jax.devices()[:1])
            params = jax.device_get(state.params)
        out.append(Model(name, params, model_cfg))
    out.sort(key=lambda m: lm.flops(m.cfg, 16, 16))
    return out


def problems_for(task: ml_collections.ConfigDict, n: int, seed: int, split: str = "test", num_steps=None):
    """`n` held-out arithmetic problems of the config's task (optionally another step-count range: a difficulty mix)."""
    steps = tuple(task.num_steps) if num_steps is None else num_steps
    rng = np.random.default_rng([data.split_seed(seed, split), 7])
    return arithmetic.sample_problems(rng, n, num_steps=steps, modulus=int(task.modulus))


def build_probe(config: ml_collections.ConfigDict, workdir: str | None) -> Model | None:
    """The hidden-state router's probe LM (`config.routers.probe`, trained like the models), or None if unset."""
    probe = config.routers.get("probe")
    if not probe:
        return None
    return build_models(config, workdir, entries={"probe": probe})[0]


def fit_router(
    name: str,
    t: OutcomeTable,
    index,
    models: list[Model],
    seed: int = 0,
    probe: Model | None = None,
    probe_layers: int | None = None,
) -> routers.Router:
    """One router of `ROUTERS` fit on table rows `index`.

    The hidden-state router reads `probe` if given, else the cheapest model; `probe_layers` keeps only that many of
    the read LM's first blocks (`routers.prefix_model`).
    """
    if name == "mf":
        return routers.MFRouter.fit(t, index, seed=seed)
    if name == "knn":
        return routers.KNNRouter.fit(t, index, k=min(16, len(index)))
    if name == "hidden":
        reader = models[0] if probe is None else probe
        return routers.HiddenStateRouter.fit(t, index, model=reader, layers=probe_layers)
    if name == "difficulty":
        return routers.DifficultyRouter.fit(t, index)
    if name == "random":
        return routers.RandomRouter(t.num_models, seed=seed)
    if name == "oracle":
        return routers.OracleRouter(t)
    raise ValueError(f"router {name!r} is not one of {ROUTERS}")


def build_routers(
    config: ml_collections.ConfigDict, models: list[Model], probe: Model | None = None
) -> dict[str, routers.Router]:
    """Routers named in `config.routers.names` fit on a table of the models over `config.routers.table_problems`."""
    names = [n for n in config.routers.names.split(",") if n]
    if not names:
        return {}
    probs = problems_for(config.task, int(config.routers.table_problems), int(config.seed), split="eval")
    t = build_table(models, probs, batch_size=min(128, len(probs)))
    idx = np.arange(t.num_queries)
    layers = config.routers.get("probe_layers")
    return {n: fit_router(n, t, idx, models, int(config.seed), probe, layers) for n in names if n != "oracle"}


# ---------------------------------------------------------------------------------------------------------------
# The study.


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the study config's routers, mixes and shares before anything is built."""
    for n in config.routers.names.split(","):
        if n and n not in ROUTERS:
            raise ValueError(f"config.routers.names: {n!r} is not one of {ROUTERS}")
    if len(config.models) < 2:
        raise ValueError(f"config.models: routing needs at least 2 models, got {len(config.models)}")
    if not 0 < config.study.keep_accuracy <= 1:
        raise ValueError(f"config.study.keep_accuracy must be in (0, 1], got {config.study.keep_accuracy}")


def _points(results) -> list[list[float]]:
    return [[r.point.cost, r.point.accuracy] for r in results]


def smallest_share_at(t: OutcomeTable, index, router: routers.Router, keep: float) -> dict:
    """The largest share of calls the smallest model can take while accuracy >= keep x the largest model's.

    Two tiers, as in the claim under test: the router's calibrated thresholds send a share s of the queries to the
    smallest model and the rest to the largest (shares [s, 0, ..., 1 - s]); s is scanned down from 1 in steps of
    0.01 and the first s that keeps the accuracy is returned (shares are measured, not the targets).
    """
    q = t.queries(index)
    probs = router.predict(q)
    target = keep * t.correct[index, -1].mean()
    M = t.num_models
    for share in np.linspace(1.0, 0.0, 101):
        tau = calibrate.calibrate_shares(probs, q.tiebreak, [share] + [0.0] * (M - 2) + [1.0 - share])
        res = calibrate.evaluate(t, index, probs, q.tiebreak, tau, router.flops(q))
        if res.correct.mean() >= target:
            return {
                "share": float(res.shares(M)[0]),
                "accuracy": float(res.correct.mean()),
                "target": float(target),
                "mean_flops": float(res.cost.mean()),
            }
    return {"share": 0.0, "accuracy": None, "target": float(target)}


def evaluate_mix(t: OutcomeTable, train, test, models, config, probe: Model | None = None) -> dict:
    """Every router's and cascade's points and metrics on rows `test`, routers fit on rows `train`.

    Each router's `cost_share` is its decision's mean FLOPs over the smallest model's mean generation FLOPs.
    """
    pts = calibrate.model_points(t, test)
    weak, strong = pts[0], pts[-1]
    out = {"models": {m: list(p) for m, p in zip(t.names, pts)}, "routers": {}, "cascades": {}}
    oracle = _points(calibrate.sweep(routers.OracleRouter(t), t, test)[1])
    fitted = {}
    for name in [n for n in config.routers.names.split(",") if n]:
        r = fit_router(name, t, train, models, int(config.seed), probe, config.routers.get("probe_layers"))
        fitted[name] = r
        p = _points(calibrate.sweep(r, t, test)[1])
        if name not in ("random", "oracle"):  # the expected-utility rule on the same predictions
            pu = _points(calibrate.sweep_utility(r, t, test, cost_M=t.flops[train].mean(axis=0))[1])
            out["routers"][name + "+utility"] = {"points": pu, "metrics": metrics.summary(pu, weak, strong, oracle)}
        out["routers"][name] = {
            "points": p,
            "metrics": metrics.summary(p, weak, strong, oracle),
            "smallest_share": smallest_share_at(t, test, r, config.study.keep_accuracy),
            "cost_share": float(r.flops(t.queries(test)).mean() / t.flops[test, 0].mean()),
        }
    ends = t.select_models([0, t.num_models - 1])  # the two-stage cascade: smallest, then largest
    for conf in t.confidence:
        p = _points(cascade.sweep_cascade(t, test, conf)[1])
        out["cascades"][conf] = {"points": p, "metrics": metrics.summary(p, weak, strong, oracle)}
        if t.num_models > 2:
            p = _points(cascade.sweep_cascade(ends, test, conf)[1])
            out["cascades"][f"{conf}, smallest->largest"] = {
                "points": p,
                "metrics": metrics.summary(p, weak, strong, oracle),
            }
    return out, fitted


def _plot(result: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in result["routers"].items():
        p = np.asarray(metrics.frontier(r["points"]))
        ax.plot(p[:, 0], p[:, 1], marker=".", label=f"router {name}")
    for name, r in result["cascades"].items():
        p = np.asarray(metrics.frontier(r["points"]))
        ax.plot(p[:, 0], p[:, 1], ls="--", marker="x", label=f"cascade ({name})")
    for name, (c, a) in result["models"].items():
        ax.scatter([c], [a], s=60, color="k", zorder=5)
        ax.annotate(name, (c, a), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("mean FLOPs per query (lm.flops)")
    ax.set_ylabel("answer accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shares(results: dict, path: str) -> None:
    """The smallest model's share of calls at the kept accuracy, per router, across the difficulty mixes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = sorted(results["mixes"], key=lambda m: np.mean(results["mixes"][m].get("steps", 0)))  # easiest first
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [n for n, v in results["mixes"][mixes[0]]["routers"].items() if "smallest_share" in v]
    for name in names:
        shares = [results["mixes"][m]["routers"][name]["smallest_share"]["share"] for m in mixes]
        ax.plot(range(len(mixes)), shares, marker="o", ls="--" if name in ("oracle", "random") else "-", label=name)
    ax.set_xticks(
        range(len(mixes)), [f"{m}\nacc xs {results['mixes'][m]['models'][results['models'][0]][1]:.2f}" for m in mixes]
    )
    ax.set_ylabel("smallest model's share of calls")
    ax.set_ylim(0, 1)
    ax.set_title("smallest model's share of calls at 95% of the largest's accuracy", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the models, builds one outcome table per difficulty mix, evaluates routers and cascades, writes results."""
    validate(config)
    models = build_models(config, workdir)
    probe = build_probe(config, workdir)
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    results = {"models": [m.name for m in models], "mixes": {}}
    if probe is not None:
        results["probe"] = {"name": probe.name, **{k: getattr(probe.cfg, k) for k in ("d_model", "n_layers")}}
    tables, fitted = {}, {}
    for mix, steps in config.study.mixes.items():
        path = os.path.join(workdir, "results", f"table_{mix}.npz")
        if os.path.exists(path):
            t = OutcomeTable.load(path)
        else:
            probs = problems_for(config.task, int(config.study.queries), int(config.seed), num_steps=tuple(steps))
            t = build_table(models, probs, samples=int(config.study.samples), seed=int(config.seed))
            t.save(path)
        tables[mix] = t
        idx = np.random.default_rng(int(config.seed)).permutation(t.num_queries)
        train, test = np.sort(idx[: len(idx) // 2]), np.sort(idx[len(idx) // 2 :])
        res, fitted[mix] = evaluate_mix(t, train, test, models, config, probe)
        res["steps"] = list(steps)
        results["mixes"][mix] = res
        _plot(res, os.path.join(workdir, "figures", f"routing_{mix}.png"), f"difficulty mix {mix} (K={steps})")
    results["transfer"] = transfer(tables, fitted, config)
    plot_shares(results, os.path.join(workdir, "figures", "routing_share.png"))
    with open(os.path.join(workdir, "results", "routing.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def transfer(tables: dict, fitted: dict, config) -> dict:
    """APGR of each router fit on one mix's training half and evaluated on every mix's test half."""
    out = {}
    for src, rs in fitted.items():
        for dst, t in tables.items():
            idx = np.random.default_rng(int(config.seed)).permutation(t.num_queries)
            test = np.sort(idx[len(idx) // 2 :])
            pts = calibrate.model_points(t, test)
            oracle = _points(calibrate.sweep(routers.OracleRouter(t), t, test)[1])
            for name, r in rs.items():
                if name in ("oracle", "random"):
                    continue
                p = _points(calibrate.sweep(r, t, test)[1])
                try:
                    m = metrics.summary(p, pts[0], pts[-1], oracle)
                except ValueError as e:  # e.g. equal weak/strong accuracy on a mix
                    m = {"error": str(e)}
                out[f"{name}:{src}->{dst}"] = m
    return out
