"""The preference study: the DPO family at matched steps on arithmetic pairs, each kind at its own tuned learning
rate, two seeds, with label-noise and length-skew arms.

  .venv/bin/python -m scripts.reproduce.preference --workdir=runs/preference_study

Setting (configs/preference/study.py): the tiny LM SFT'd on mod-10 chains with K = 1..5 until its held-out token
accuracy reaches 0.95 (a partly right policy, once per seed in <workdir>/sft_s<seed>), then each arm trains the same
number of steps with the SFT policy as reference on pairs of the gold trace vs (--source=policy) a wrong completion
sampled from that SFT policy (sampled once per seed and shared by every arm: pairs that differ where the policy
errs) or (--source=corrupt) the gold trace with one corrupted step. KTO trains on the same pairs unpaired, twice the
rows per step, so every kind sees the same completions per step. "a+b" kinds are weighted lists (sigmoid+sft = RPO,
DPO plus the chosen NLL); "sft" alone (the chosen NLL) is the control that separates the preference term from it.
1. LR sweep per kind (--kinds) on the first seed: --lrs, extended by one grid point (×√10) past whichever end holds
   the best held-out exact match (mean over K), up to --extend times; the LR kept is the best, marked "edge" when it
   is still the smallest or largest swept (not bracketed).
2. The other seeds at each kind's kept LR.
3. Label noise: --flips of the training labels swapped, for --noise_kinds (cdpo and robust with ε = the flip rate),
   every seed, at the matched LR (the first noise kind's kept LR) and at each kind's own kept LR, plus --noise_lrs.
4. Length bias: chosen completions padded with --skew filler characters after the answer line, for --length_kinds
   at their kept LR; measured as the mean characters a greedy completion has beyond the gold solution.
Every run is `experiments.preference.run` in <workdir>/runs/<arm>/ (resumable: a finished run's results are read
back). Writes <workdir>/results/preference.json and <workdir>/figures/preference.png.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from absl import app, flags

from configs.preference import study
from experiments import preference
from framework.models import lm

flags.DEFINE_string("workdir", "runs/preference_study", "where runs, results and figures go")
flags.DEFINE_list(
    "kinds",
    ["sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "alphadpo", "kto", "sigmoid+sft", "sft"],
    "kinds compared (a+b: a weighted list, e.g. sigmoid+sft = RPO, DPO plus the chosen NLL; sft alone: the control)",
)
flags.DEFINE_list("lrs", ["3e-6", "3e-5", "3e-4"], "learning rates swept per kind (first seed), before extension")
flags.DEFINE_integer("extend", 2, "grid points added past an edge that holds the best exact match, at most")
flags.DEFINE_bool("extend_down", True, "also extend below the smallest LR (towards the SFT policy itself)")
flags.DEFINE_list("seeds", ["1", "2"], "seeds (SFT policy, data order, held-out problems)")
flags.DEFINE_list("flips", ["0.2", "0.4"], "label flip rates of the noise arm (0 comes from the sweep)")
flags.DEFINE_list(
    "noise_kinds", ["sigmoid", "cdpo", "robust"], "kinds of the noise arm (the first sets the matched LR)"
)
flags.DEFINE_list(
    "noise_lrs", ["3e-5"], "extra learning rates of the noise arm (every noise kind, clean and noisy): where DPO moves"
)
flags.DEFINE_bool("noise_tuned", True, "run the noise arm at the matched and each kind's own kept LR too")
flags.DEFINE_list("length_kinds", ["sigmoid", "simpo", "orpo"], "kinds of the length arm")
flags.DEFINE_list("length_lrs", ["3e-5"], "extra learning rates of the length arm (besides each kind's kept LR)")
flags.DEFINE_integer("skew", 8, "filler characters added to the chosen completions in the length arm")
flags.DEFINE_integer("steps", 150, "preference steps of every arm")
flags.DEFINE_integer("problems_per_k", 64, "held-out problems per K")
flags.DEFINE_enum(
    "source", "policy", ["policy", "corrupt"], "pairs: the SFT policy's wrong samples, or corrupted steps"
)
flags.DEFINE_string(
    "sft_stop",
    None,
    "the SFT stage's train.stop_when (default: the config's, token accuracy 0.95; '' = its full schedule)",
)
flags.DEFINE_bool("report_only", False, "summarise the finished runs of <workdir> (a partial study) without training")
FLAGS = flags.FLAGS

KIND_HPARAMS = {
    "cdpo": dict(epsilon=0.1),
    "robust": dict(epsilon=0.1),
    "simpo": dict(beta=2.0, gamma=0.5),
    "alphadpo": dict(beta=2.0, gamma=0.5, alpha=0.2),
}
KTO_ROWS_PER_PAIR = 2  # a KTO step takes 2x the pair batch in rows: the same completions per step as a paired kind


def arm_config(kind: str, seed: int, lr: float, *, flip: float = 0.0, skew: int = 0):
    config = study.get_config(f"seed={seed},lr={lr},source={FLAGS.source}")
    config.unlock()
    config.pref.kind = kind.replace("+", ",")
    config.train.steps = FLAGS.steps
    config.train.progress = False
    config.eval.problems_per_k = FLAGS.problems_per_k
    config.pairs.update(flip_rate=flip, length_skew=skew)
    if FLAGS.sft_stop is not None:
        config.sft.stop_when = FLAGS.sft_stop
        if not FLAGS.sft_stop:  # no early stop to check: evaluate the SFT stage rarely
            config.sft.eval_every = 500
    for k, v in KIND_HPARAMS.get(kind, {}).items():
        config.pref[k] = v
    if kind == preference.KTO:
        config.train.batch_size *= KTO_ROWS_PER_PAIR
    if flip and kind in ("cdpo", "robust"):
        config.pref.epsilon = min(flip, 0.45)  # the noise model's ε at the true flip rate
    config.lock()
    return config


def exact(results) -> float:
    """Held-out exact match, mean over K."""
    return float(np.mean([v["exact_match"] for v in results["accuracy_by_k"].values()]))


class Study:
    def __init__(self, workdir: str, report_only: bool = False):
        self.workdir = workdir
        self.report_only = report_only
        self.sft: dict[int, tuple] = {}

    def done(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.workdir, "runs", name, "results", "preference.json"))

    def finished_lrs(self, kind: str, seed: int) -> list[float]:
        """LRs of `kind`'s finished sweep runs on `seed` (a resumed study keeps every point it has)."""
        root, pre, post = os.path.join(self.workdir, "runs"), f"sweep_{kind}_lr", f"_s{seed}"
        names = os.listdir(root) if os.path.isdir(root) else []
        return [
            float(n[len(pre) : -len(post)]) for n in names if n.startswith(pre) and n.endswith(post) and self.done(n)
        ]

    def start(self, seed: int):
        """(SFT params, their evaluation) of a seed, trained once in <workdir>/sft_s<seed>."""
        if seed not in self.sft:
            config = arm_config("sigmoid", seed, 1e-4)
            params = preference.sft_policy(config, os.path.join(self.workdir, f"sft_s{seed}"))
            model_cfg = lm.LMConfig.from_config(config.model)
            sampled = {}
            if config.pairs.source == "policy":  # the SFT policy's pairs, sampled once per seed for every arm
                sampled = {s: preference.policy_pairs(config, params, s, n) for s, n in self.pair_counts(config)}
            self.sft[seed] = (params, preference.greedy_eval(params, model_cfg, config), sampled)
        return self.sft[seed]

    @staticmethod
    def pair_counts(config):
        return (("train", config.pairs.n), ("eval", config.pairs.eval_n))

    def run(self, name: str, kind: str, seed: int, lr: float, **kw) -> dict | None:
        """The results of one arm (trained unless finished; None for an unfinished arm under --report_only)."""
        workdir = os.path.join(self.workdir, "runs", name)
        path = os.path.join(workdir, "results", "preference.json")
        if not os.path.exists(path) and self.report_only:
            return None
        if os.path.exists(path):
            with open(path) as f:
                out = json.load(f)
        else:
            params, sft_eval, sampled = self.start(seed)
            t0, c0 = time.time(), time.process_time()
            config = arm_config(kind, seed, lr, **kw)
            out = preference.run(config, workdir, start_params=params, sft_eval=sft_eval, sampled=sampled)
            out.pop("params")
            out.update(wall_s=time.time() - t0, cpu_s=time.process_time() - c0)
            with open(path, "w") as f:
                json.dump(out, f, indent=1)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(x) for x in f if x.strip()]
        keys = ("logps/chosen", "logps/rejected", "sum_logps/chosen", "sum_logps/rejected", "rewards/margins")
        keys += ("rewards/accuracies", "loss", "kl")
        out["trajectory"] = {k: [[r["step"], r[f"train/{k}"]] for r in records if f"train/{k}" in r] for k in keys}
        out.update(name=name, kind=kind, seed=seed, lr=lr, **kw)
        print(
            f"{name}: exact {exact(out['policy']):.3f} (SFT {exact(out['sft']):.3f}), reward acc "
            f"{out['heldout_pairs']['rewards/accuracies']:.3f}, extra chars {out['policy']['extra_chars']:.2f}",
            flush=True,
        )
        return out


def _grid_neighbour(lr: float, up: bool) -> float:
    """The next point of the half-decade grid (1e-5, 3e-5, 1e-4, ...) above or below `lr`."""
    e = math.log10(lr) + (0.5 if up else -0.5)
    return float(f"{10**e:.0e}") if abs(e - round(e)) > 0.25 else float(10 ** round(e))


def sweep(
    st: Study, kind: str, seed: int, lrs: list[float], extend: int, down: bool = True
) -> tuple[list[dict], dict | None]:
    """Runs `kind` at `lrs` (and keeps any LR already finished) on `seed`, extending past the edge holding the best
    exact match; (runs, kept)."""
    grid = sorted(set(lrs) | set(st.finished_lrs(kind, seed)))
    runs = {lr: st.run(f"sweep_{kind}_lr{lr:g}_s{seed}", kind, seed, lr) for lr in grid}
    runs = {lr: r for lr, r in runs.items() if r is not None}
    grid = sorted(runs)
    if not grid:
        return [], None
    for _ in range(0 if st.report_only else extend):
        best = max(grid, key=lambda lr: (exact(runs[lr]["policy"]), -lr))
        if best not in (grid[0], grid[-1]) or len(grid) == 1 or (best == grid[0] and not down):
            break
        lr = _grid_neighbour(best, up=best == grid[-1])
        runs[lr] = st.run(f"sweep_{kind}_lr{lr:g}_s{seed}", kind, seed, lr)
        grid = sorted(runs)
    best = max(grid, key=lambda lr: (exact(runs[lr]["policy"]), -lr))
    return [runs[lr] for lr in grid], dict(lr=best, edge=best in (grid[0], grid[-1]), swept=grid)


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    lrs = [float(x) for x in FLAGS.lrs]
    # Arms share most programs (evaluation, reference scoring, same-kind steps): compile each once per study
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(FLAGS.workdir), "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    st = Study(FLAGS.workdir, FLAGS.report_only)
    t0, c0 = time.time(), time.process_time()
    if FLAGS.source == "policy" and not FLAGS.report_only and nothing_to_learn(st, seeds):
        return
    runs, kept = [], {}
    for kind in FLAGS.kinds:  # 1. LR sweep on the first seed
        rs, k = sweep(st, kind, seeds[0], lrs, FLAGS.extend, FLAGS.extend_down)
        runs += rs
        if k is not None:
            kept[kind] = k
    for kind in kept:  # 2. the other seeds at the kept LR
        for seed in seeds[1:]:
            runs.append(st.run(f"sweep_{kind}_lr{kept[kind]['lr']:g}_s{seed}", kind, seed, kept[kind]["lr"]))
    noise_lr = {}
    if (
        FLAGS.noise_kinds and FLAGS.noise_kinds[0] in kept
    ):  # 3. label noise at the matched LR, each kind's own kept LR and --noise_lrs
        matched = kept.get(FLAGS.noise_kinds[0], dict(lr=lrs[0]))["lr"]
        for kind in FLAGS.noise_kinds:
            own = kept.get(kind, dict(lr=matched))["lr"]
            tuned = {matched, own} if FLAGS.noise_tuned else set()
            noise_lr[kind] = sorted(tuned | set(map(float, FLAGS.noise_lrs)))
        for kind in FLAGS.noise_kinds:
            for lr in noise_lr[kind]:
                for seed in seeds:
                    runs.append(st.run(f"sweep_{kind}_lr{lr:g}_s{seed}", kind, seed, lr))  # the clean point
                    for flip in map(float, FLAGS.flips):
                        runs.append(st.run(f"flip{flip:g}_{kind}_lr{lr:g}_s{seed}", kind, seed, lr, flip=flip))
    for kind in FLAGS.length_kinds:  # 4. length-skewed pairs
        lr = kept.get(kind, kept.get("sigmoid", dict(lr=lrs[0])))["lr"]
        for seed in seeds:
            runs.append(st.run(f"skew{FLAGS.skew}_{kind}_s{seed}", kind, seed, lr, skew=FLAGS.skew))
            for extra in map(float, FLAGS.length_lrs):
                name, clean = f"skew{FLAGS.skew}_{kind}_lr{extra:g}_s{seed}", f"sweep_{kind}_lr{extra:g}_s{seed}"
                runs += [st.run(clean, kind, seed, extra), st.run(name, kind, seed, extra, skew=FLAGS.skew)]
    runs = [r for r in runs if r is not None]
    sft = {s: r["sft"] for r in runs for s in seeds if r["seed"] == s}
    unique = {r["name"]: r for r in runs}
    summary = dict(
        settings=dict(
            kinds=[k for k in FLAGS.kinds if k in kept],
            lrs=lrs,
            extend=FLAGS.extend,
            extend_down=FLAGS.extend_down,
            seeds=seeds,
            flips=FLAGS.flips,
            noise_kinds=FLAGS.noise_kinds,
            noise_lr=noise_lr,
            length_kinds=FLAGS.length_kinds,
            skew=FLAGS.skew,
            steps=FLAGS.steps,
            problems_per_k=FLAGS.problems_per_k,
            kind_hparams=KIND_HPARAMS,
            kto_rows_per_pair=KTO_ROWS_PER_PAIR,
            source=FLAGS.source,
            sft_stop_when=arm_config("sigmoid", seeds[0], lrs[0]).sft.stop_when,
            jax=jax.__version__,
        ),
        kept_lr=kept,
        sft=sft,
        runs=list(unique.values()),
        wall_s=time.time() - t0,
        cpu_s=time.process_time() - c0,
        runs_cpu_s=sum(r.get("cpu_s", 0.0) for r in unique.values()),
    )
    os.makedirs(os.path.join(FLAGS.workdir, "results"), exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "results", "preference.json"), "w") as f:
        json.dump(summary, f, indent=1)
    figure(summary, os.path.join(FLAGS.workdir, "figures", "preference.png"))
    print(table(summary))
    print(sweep_table(summary))
    print(noise_table(summary))
    print(length_table(summary))


def nothing_to_learn(st: Study, seeds: list[int]) -> bool:
    """True (and <workdir>/results/preference.json holds each seed's SFT evaluation and pair counts) when a seed's SFT
    policy leaves fewer on-policy pairs than one batch: it (nearly) never errs, so there is no preference to train."""
    config = arm_config("sigmoid", seeds[0], 1e-4)
    report = {}
    for seed in seeds:
        _, sft_eval, sampled = st.start(seed)
        report[seed] = dict(sft=sft_eval, pairs={s: stats for s, (_, stats) in sampled.items()})
    if all(r["pairs"]["train"]["pairs"] >= config.train.batch_size for r in report.values()):
        return False
    os.makedirs(os.path.join(FLAGS.workdir, "results"), exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "results", "preference.json"), "w") as f:
        json.dump(
            dict(stopped="fewer on-policy pairs than one batch", sft_stop_when=config.sft.stop_when, seeds=report), f
        )
    for seed, r in report.items():
        print(f"seed {seed}: SFT exact match {exact(r['sft']):.3f}, on-policy pairs {r['pairs']}")
    print(f"fewer on-policy pairs than one batch ({config.train.batch_size}): nothing to train; see the results JSON")
    return True


def _kept_runs(summary, kind):
    lr = summary["kept_lr"][kind]["lr"]
    return sorted(
        [r for r in summary["runs"] if r["name"].startswith(f"sweep_{kind}_") and r["lr"] == lr],
        key=lambda r: r["seed"],
    )


def _sft(summary, seed):
    return summary["sft"][seed] if seed in summary["sft"] else summary["sft"][str(seed)]


def _per_seed(rs, f, fmt="{:.3f}") -> str:
    return " / ".join(fmt.format(f(r)) for r in rs)


def _change(r, key) -> float:
    if r["kind"] == preference.KTO:  # KTO logs the summed log-probs of its desirable / undesirable rows
        key = key.replace("sum_logps", "logps")
    traj = r["trajectory"][key]
    return traj[-1][1] - traj[0][1]


def table(summary) -> str:
    """Markdown: per kind, the swept and kept LR, held-out exact match and reward accuracy per seed (and the change
    from the seed's SFT policy), and the training batches' summed chosen/rejected log-prob change and last margin."""
    seeds = summary["settings"]["seeds"]
    sft = " / ".join(f"{exact(_sft(summary, s)):.3f}" for s in seeds)
    lines = [
        "| kind | LRs swept | kept LR | exact match (seeds " + ", ".join(map(str, seeds)) + ") | Δ vs SFT | "
        "reward acc. | Δ Σlogp chosen | Δ Σlogp rejected | last margin |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| SFT policy | – | – | {sft} | – | – | – | – | – |",
    ]
    for kind in summary["settings"]["kinds"]:
        rs, k = _kept_runs(summary, kind), summary["kept_lr"][kind]
        swept = ", ".join(f"{x:g}" for x in k["swept"])
        lines.append(
            f"| {kind} | {swept} | {k['lr']:g}{' (edge)' if k['edge'] else ''} | {_per_seed(rs, lambda r: exact(r['policy']))} "
            f"| {_per_seed(rs, lambda r: exact(r['policy']) - exact(r['sft']), '{:+.3f}')} "
            f"| {_per_seed(rs, lambda r: r['heldout_pairs']['rewards/accuracies'])} "
            f"| {_per_seed(rs, lambda r: _change(r, 'sum_logps/chosen'), '{:+.1f}')} "
            f"| {_per_seed(rs, lambda r: _change(r, 'sum_logps/rejected'), '{:+.1f}')} "
            f"| {_per_seed(rs, lambda r: r['trajectory']['rewards/margins'][-1][1], '{:.2f}')} |"
        )
    return "\n".join(lines)


def sweep_table(summary) -> str:
    """Markdown: held-out exact match (first seed) of every kind at every swept LR."""
    lrs = sorted({lr for k in summary["kept_lr"].values() for lr in k["swept"]})
    seed = summary["settings"]["seeds"][0]
    lines = ["| kind | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for kind in summary["settings"]["kinds"]:
        cells = []
        for lr in lrs:
            r = [x for x in summary["runs"] if x["name"] == f"sweep_{kind}_lr{lr:g}_s{seed}"]
            best = lr == summary["kept_lr"][kind]["lr"]
            cells.append(("**{:.3f}**" if best else "{:.3f}").format(exact(r[0]["policy"])) if r else "")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _noise_runs(summary, kind, lr, flip):
    if flip == 0:
        return sorted(
            [r for r in summary["runs"] if r["name"].startswith(f"sweep_{kind}_lr{lr:g}_s")], key=lambda r: r["seed"]
        )
    return sorted(
        [r for r in summary["runs"] if r["name"].startswith(f"flip{flip:g}_{kind}_lr{lr:g}_s")],
        key=lambda r: r["seed"],
    )


def noise_table(summary) -> str:
    """Markdown: exact match and held-out reward accuracy per seed vs the flip rate, per noise kind and LR."""
    flips = [0.0] + [float(f) for f in summary["settings"]["flips"]]
    lines = [
        "| kind | LR | "
        + " | ".join(f"exact @ {f:g}" for f in flips)
        + " | "
        + " | ".join(f"reward acc. @ {f:g}" for f in flips)
        + " |",
        "|---|---:|" + "---:|" * (2 * len(flips)),
    ]
    for kind, lrs in summary["settings"]["noise_lr"].items():
        for lr in lrs:
            rows = [_noise_runs(summary, kind, lr, f) for f in flips]
            em = [_per_seed(rs, lambda r: exact(r["policy"])) for rs in rows]
            acc = [_per_seed(rs, lambda r: r["heldout_pairs"]["rewards/accuracies"]) for rs in rows]
            lines.append(f"| {kind} | {lr:g} | " + " | ".join(em) + " | " + " | ".join(acc) + " |")
    return "\n".join(lines)


def length_table(summary) -> str:
    """Markdown: greedy characters beyond the gold solution and exact match, clean vs length-skewed pairs, per kind
    and LR (the clean runs are the sweep's at the same LR)."""
    lines = [
        "| kind | LR | extra chars, clean pairs | extra chars, skewed pairs | exact, clean | exact, skewed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    skewed = [r for r in summary["runs"] if r.get("skew")]
    for kind, lr in sorted({(r["kind"], r["lr"]) for r in skewed}):
        skew = sorted([r for r in skewed if r["kind"] == kind and r["lr"] == lr], key=lambda r: r["seed"])
        clean = sorted(
            [r for r in summary["runs"] if r["name"].startswith(f"sweep_{kind}_lr{lr:g}_s")], key=lambda r: r["seed"]
        )
        lines.append(
            f"| {kind} | {lr:g} | {_per_seed(clean, lambda r: r['policy']['extra_chars'], '{:.2f}')} "
            f"| {_per_seed(skew, lambda r: r['policy']['extra_chars'], '{:.2f}')} "
            f"| {_per_seed(clean, lambda r: exact(r['policy']))} | {_per_seed(skew, lambda r: exact(r['policy']))} |"
        )
    return "\n".join(lines)


def figure(summary, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    kinds = summary["settings"]["kinds"]
    seed = summary["settings"]["seeds"][0]

    def chosen_rejected(r):
        kc, kr = (
            ("logps/chosen", "logps/rejected")
            if r["kind"] == preference.KTO
            else ("sum_logps/chosen", "sum_logps/rejected")
        )
        return r["trajectory"].get(kc), r["trajectory"].get(kr)

    ax = axes[0, 0]  # every kind at its kept LR
    for kind in kinds:
        lr = summary["kept_lr"][kind]["lr"]
        rs = [r for r in summary["runs"] if r["name"] == f"sweep_{kind}_lr{lr:g}_s{seed}"]
        if not rs or not all(chosen_rejected(rs[0])):
            continue
        c, rj = chosen_rejected(rs[0])
        line = ax.plot(*zip(*c), label=kind)[0]
        ax.plot(*zip(*rj), ls="--", color=line.get_color())
    ax.set(xlabel="step", ylabel="Σ log-prob (train batch)", title="kept LR, seed 1: chosen (solid), rejected (dashed)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[0, 1]  # DPO across its LR sweep: the chosen log-prob against the margin
    for r in sorted(
        [r for r in summary["runs"] if r["name"].startswith("sweep_sigmoid_") and r["seed"] == seed],
        key=lambda r: r["lr"],
    ):
        c, _ = chosen_rejected(r)
        m = r["trajectory"]["rewards/margins"]
        if c and m:
            ax.plot([v for _, v in m], [v for _, v in c], marker=".", label=f"lr {r['lr']:g}")
    ax.set(
        xlabel="rewards/margins (train batch)",
        ylabel="Σ log-prob chosen",
        yscale="symlog",
        title="DPO, seed 1: chosen log-prob as the margin grows",
    )
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    for kind in kinds:
        swept = summary["kept_lr"][kind]["swept"]
        ys = [
            [exact(r["policy"]) for r in summary["runs"] if r["name"] == f"sweep_{kind}_lr{lr:g}_s{seed}"]
            for lr in swept
        ]
        ax.plot(swept, [y[0] for y in ys], marker="o", label=kind)
    ax.axhline(exact(_sft(summary, seed)), color="k", ls=":", label="SFT")
    ax.set(xscale="log", xlabel="learning rate", ylabel="held-out exact match (mean over K)", title="LR sweep, seed 1")
    ax.legend(fontsize=7, ncol=2)
    flips = [0.0] + [float(f) for f in summary["settings"]["flips"]]
    for ax, metric in ((axes[1, 0], "exact"), (axes[1, 1], "acc")):
        for kind, lrs in summary["settings"]["noise_lr"].items():
            for lr in lrs:
                ys = []
                for f in flips:
                    rs = _noise_runs(summary, kind, lr, f)
                    ys.append(
                        [
                            exact(r["policy"]) if metric == "exact" else r["heldout_pairs"]["rewards/accuracies"]
                            for r in rs
                        ]
                    )
                ax.errorbar(
                    flips,
                    [np.mean(y) if y else np.nan for y in ys],
                    yerr=[np.ptp(y) / 2 if y else 0 for y in ys],
                    marker="o",
                    capsize=3,
                    label=f"{kind} lr {lr:g}",
                )
        ax.set(xlabel="flipped label fraction")
        ax.legend(fontsize=7)
    axes[1, 0].set(ylabel="held-out exact match (bar = seed range)", title="label noise: exact match")
    axes[1, 1].set(ylabel="held-out reward accuracy (clean pairs)", title="label noise: reward accuracy")
    ax = axes[1, 2]
    skewed = [r for r in summary["runs"] if r.get("skew")]
    groups = sorted({(r["kind"], r["lr"]) for r in skewed})
    for i, (kind, lr) in enumerate(groups):
        sk = [r["policy"]["extra_chars"] for r in skewed if r["kind"] == kind and r["lr"] == lr]
        clean = [
            r["policy"]["extra_chars"] for r in summary["runs"] if r["name"].startswith(f"sweep_{kind}_lr{lr:g}_s")
        ]
        ax.bar(i - 0.2, np.mean(clean) if clean else 0, 0.4, color="C0", label="clean pairs" if i == 0 else None)
        ax.bar(i + 0.2, np.mean(sk), 0.4, color="C3", label="chosen + skew chars" if i == 0 else None)
        ax.plot([i + 0.2] * len(sk), sk, "k.")
    ax.set_xticks(range(len(groups)), [f"{k}\nlr {lr:g}" for k, lr in groups], fontsize=8)
    ax.set(ylabel="chars beyond the gold solution (greedy; dots = seeds)", title="length bias")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
