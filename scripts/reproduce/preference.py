"""The preference study: DPO-family kinds at matched steps on arithmetic pairs, with per-kind LR sweeps, label noise
and length-skewed pairs, two seeds.

  .venv/bin/python -m scripts.reproduce.preference --workdir=runs/preference_study

Setting (configs/preference/study.py): the tiny LM SFT'd on mod-10 chains with K = 1..5 until its held-out token
accuracy reaches 0.95 (a partly right policy, once per seed in <workdir>/sft_s<seed>), then each arm trains the same
number of steps on (gold trace, one-corrupted-step trace) pairs with the SFT policy as reference:
1. LR sweep per kind (--kinds; --lrs for the first, --lrs_other for the rest) on the first seed; the LR kept is the
   one with the best held-out exact match (mean over K), marked "(edge)" when it is the smallest or largest swept
   (not bracketed; always so for a one-value grid).
2. The other seeds at each kind's kept LR.
3. Label noise: --flips of the training labels swapped, for --noise_kinds (cdpo and robust with ε = the flip rate),
   at their kept LR, every seed.
4. Length bias: chosen completions padded with --skew filler characters after the answer line, for --length_kinds;
   measured as the mean characters a greedy completion has beyond the gold solution.
Every run is `experiments.preference.run` in <workdir>/runs/<arm>/ (resumable: a finished run's results are read
back). Writes <workdir>/results/preference.json and <workdir>/figures/preference.png.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from configs.preference import study
from experiments import preference
from framework.models import lm

flags.DEFINE_string("workdir", "runs/preference_study", "where runs, results and figures go")
flags.DEFINE_list("kinds", ["sigmoid", "ipo", "cdpo", "robust", "hinge", "simpo", "orpo"], "kinds compared")
flags.DEFINE_list("lrs", ["3e-5", "1e-4", "3e-4", "1e-3"], "learning rates swept for the first kind (first seed)")
flags.DEFINE_list("lrs_other", None, "learning rates swept for the other kinds (default: --lrs)")
flags.DEFINE_list("seeds", ["1", "2"], "seeds (SFT policy, data order, held-out problems)")
flags.DEFINE_list("flips", ["0.2", "0.4"], "label flip rates of the noise arm (0 comes from the sweep)")
flags.DEFINE_list("noise_kinds", ["sigmoid", "cdpo", "robust"], "kinds of the noise arm")
flags.DEFINE_list("length_kinds", ["sigmoid", "simpo", "orpo"], "kinds of the length arm")
flags.DEFINE_integer("skew", 8, "filler characters added to the chosen completions in the length arm")
flags.DEFINE_integer("steps", 150, "preference steps of every arm")
flags.DEFINE_integer("problems_per_k", 64, "held-out problems per K")
FLAGS = flags.FLAGS

KIND_HPARAMS = {"cdpo": dict(epsilon=0.1), "robust": dict(epsilon=0.1), "simpo": dict(beta=2.0, gamma=0.5)}


def arm_config(kind: str, seed: int, lr: float, *, flip: float = 0.0, skew: int = 0):
    config = study.get_config(f"kind={kind},seed={seed},lr={lr}")
    config.unlock()
    config.train.steps = FLAGS.steps
    config.train.progress = False
    config.eval.problems_per_k = FLAGS.problems_per_k
    config.pairs.update(flip_rate=flip, length_skew=skew)
    for k, v in KIND_HPARAMS.get(kind, {}).items():
        config.pref[k] = v
    if flip and kind in ("cdpo", "robust"):
        config.pref.epsilon = min(flip, 0.45)  # the noise model's ε at the true flip rate
    config.lock()
    return config


def exact(results) -> float:
    """Held-out exact match, mean over K."""
    return float(np.mean([v["exact_match"] for v in results["accuracy_by_k"].values()]))


class Study:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.sft: dict[int, tuple] = {}

    def start(self, seed: int):
        """(SFT params, their evaluation) of a seed, trained once in <workdir>/sft_s<seed>."""
        if seed not in self.sft:
            config = arm_config("sigmoid", seed, 1e-4)
            params = preference.sft_policy(config, os.path.join(self.workdir, f"sft_s{seed}"))
            model_cfg = lm.LMConfig.from_config(config.model)
            self.sft[seed] = (params, preference.greedy_eval(params, model_cfg, config))
        return self.sft[seed]

    def run(self, name: str, kind: str, seed: int, lr: float, **kw) -> dict:
        workdir = os.path.join(self.workdir, "runs", name)
        path = os.path.join(workdir, "results", "preference.json")
        if os.path.exists(path):
            with open(path) as f:
                out = json.load(f)
        else:
            params, sft_eval = self.start(seed)
            t0 = time.time()
            out = preference.run(arm_config(kind, seed, lr, **kw), workdir, start_params=params, sft_eval=sft_eval)
            out.pop("params")
            out["wall_s"] = time.time() - t0
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(x) for x in f if x.strip()]
        keys = ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies", "loss")
        out["trajectory"] = {k: [[r["step"], r[f"train/{k}"]] for r in records if f"train/{k}" in r] for k in keys}
        out.update(name=name, kind=kind, seed=seed, lr=lr, **kw)
        print(
            f"{name}: exact {exact(out['policy']):.3f} (SFT {exact(out['sft']):.3f}), reward acc "
            f"{out['heldout_pairs']['rewards/accuracies']:.3f}, extra chars {out['policy']['extra_chars']:.2f}",
            flush=True,
        )
        return out


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    lrs = [float(x) for x in FLAGS.lrs]
    st = Study(FLAGS.workdir)
    t0 = time.time()
    runs, kept = [], {}
    other = [float(x) for x in FLAGS.lrs_other] if FLAGS.lrs_other else lrs
    for i, kind in enumerate(FLAGS.kinds):  # 1. LR sweep on the first seed
        grid = lrs if i == 0 else other
        sweep = [st.run(f"sweep_{kind}_lr{lr:g}_s{seeds[0]}", kind, seeds[0], lr) for lr in grid]
        runs += sweep
        best = max(range(len(grid)), key=lambda j: (exact(sweep[j]["policy"]), -j))
        kept[kind] = dict(lr=grid[best], edge=best in (0, len(grid) - 1), swept=grid)
    for kind in FLAGS.kinds:  # 2. the other seeds at the kept LR
        for seed in seeds[1:]:
            runs.append(st.run(f"sweep_{kind}_lr{kept[kind]['lr']:g}_s{seed}", kind, seed, kept[kind]["lr"]))
    for flip in map(float, FLAGS.flips):  # 3. label noise
        for kind in FLAGS.noise_kinds:
            lr = kept.get(kind, kept.get("sigmoid", dict(lr=lrs[0])))["lr"]
            for seed in seeds:
                runs.append(st.run(f"flip{flip:g}_{kind}_s{seed}", kind, seed, lr, flip=flip))
    for kind in FLAGS.length_kinds:  # 4. length-skewed pairs
        lr = kept.get(kind, kept.get("sigmoid", dict(lr=lrs[0])))["lr"]
        for seed in seeds:
            runs.append(st.run(f"skew{FLAGS.skew}_{kind}_s{seed}", kind, seed, lr, skew=FLAGS.skew))
    sft = {s: st.start(s)[1] for s in seeds}
    summary = dict(
        settings=dict(
            kinds=FLAGS.kinds,
            lrs=lrs,
            seeds=seeds,
            flips=FLAGS.flips,
            skew=FLAGS.skew,
            steps=FLAGS.steps,
            problems_per_k=FLAGS.problems_per_k,
            kind_hparams=KIND_HPARAMS,
            jax=jax.__version__,
        ),
        kept_lr=kept,
        sft=sft,
        runs=runs,
        wall_s=time.time() - t0,
    )
    os.makedirs(os.path.join(FLAGS.workdir, "results"), exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "results", "preference.json"), "w") as f:
        json.dump(summary, f, indent=1)
    figure(summary, os.path.join(FLAGS.workdir, "figures", "preference.png"))
    print(table(summary))


def _kept_runs(summary, kind):
    lr = summary["kept_lr"][kind]["lr"]
    return [r for r in summary["runs"] if r["name"].startswith(f"sweep_{kind}_") and r["lr"] == lr]


def table(summary) -> str:
    """Markdown: per kind, kept LR, held-out exact match and reward accuracy per seed, and the SFT baseline."""
    seeds = summary["settings"]["seeds"]
    sft = " / ".join(
        f"{exact(summary['sft'][s] if s in summary['sft'] else summary['sft'][str(s)]):.3f}" for s in seeds
    )
    lines = [
        "| kind | kept LR | exact match (seeds " + ", ".join(map(str, seeds)) + ") | reward acc. | "
        "Δ train logps/chosen (first→last log window) | last margin |",
        "|---|---:|---:|---:|---:|---:|",
        f"| SFT policy | – | {sft} | – | – | – |",
    ]
    for kind in summary["settings"]["kinds"]:
        rs = sorted(_kept_runs(summary, kind), key=lambda r: r["seed"])
        k = summary["kept_lr"][kind]
        em = " / ".join(f"{exact(r['policy']):.3f}" for r in rs)
        acc = " / ".join(f"{r['heldout_pairs']['rewards/accuracies']:.3f}" for r in rs)
        drop = " / ".join(f"{_logp_change(r):+.2f}" for r in rs)
        margin = " / ".join(f"{r['trajectory']['rewards/margins'][-1][1]:.2f}" for r in rs)
        lines.append(f"| {kind} | {k['lr']:g}{' (edge)' if k['edge'] else ''} | {em} | {acc} | {drop} | {margin} |")
    return "\n".join(lines)


def _logp_change(r) -> float:
    traj = r["trajectory"]["logps/chosen"]
    return traj[-1][1] - traj[0][1]


def figure(summary, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for kind in summary["settings"]["kinds"]:
        rs = _kept_runs(summary, kind)
        if rs:
            steps, vals = zip(*rs[0]["trajectory"]["logps/chosen"])
            line = ax.plot(steps, vals, label=f"{kind} chosen")[0]
            steps, vals = zip(*rs[0]["trajectory"]["logps/rejected"])
            ax.plot(steps, vals, ls="--", color=line.get_color())
    ax.set(xlabel="step", ylabel="logps (train batch; solid chosen, dashed rejected)", title="log-prob trajectories")
    ax.legend(fontsize=7)
    ax = axes[1]
    flips = [0.0] + [float(f) for f in summary["settings"]["flips"]]
    for kind in sorted({r["kind"] for r in summary["runs"] if r.get("flip")}):
        ys = []
        for f in flips:
            rs = (
                _kept_runs(summary, kind)
                if f == 0
                else [r for r in summary["runs"] if r.get("flip") == f and r["kind"] == kind]
            )
            ys.append([exact(r["policy"]) for r in rs])
        ax.errorbar(
            flips,
            [np.mean(y) for y in ys],
            yerr=[np.ptp(y) / 2 if y else 0 for y in ys],
            marker="o",
            capsize=3,
            label=kind,
        )
    ax.set(
        xlabel="flipped label fraction",
        ylabel="held-out exact match (mean over K; bar = seed range)",
        title="label noise",
    )
    ax.legend(fontsize=8)
    ax = axes[2]
    kinds = sorted({r["kind"] for r in summary["runs"] if r.get("skew")})
    for i, kind in enumerate(kinds):
        skewed = [r["policy"]["extra_chars"] for r in summary["runs"] if r.get("skew") and r["kind"] == kind]
        clean = [r["policy"]["extra_chars"] for r in _kept_runs(summary, kind)]
        ax.bar(i - 0.2, np.mean(clean) if clean else 0, 0.4, color="C0", label="clean pairs" if i == 0 else None)
        ax.bar(i + 0.2, np.mean(skewed), 0.4, color="C3", label="chosen +skew chars" if i == 0 else None)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set(ylabel="chars beyond the gold solution (greedy)", title="length bias")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
