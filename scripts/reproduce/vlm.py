"""The VLM study: two-stage training on rendered expressions and its ablations, over seeds.

  python -m scripts.reproduce.vlm --workdir=runs/vlm_study [--seeds=0,1] [--pretrain_steps=500 --stage_steps=500]

Variants (configs/vlm/study.py arguments): base (MLP projector, prefix-LM mask, encoder trained, stage 1 then 2),
linear (linear projector), causal (causal mask throughout), frozen (the encoder never trained: the projector reads
the random encoder's features), no_stage1 (stage 2 straight after the text pretraining). Each variant and seed runs
`experiments.vlm.run` in <workdir>/<variant>_s<seed> (resumable). Variants with the same mask, projector and seed share
the text-pretrained LM: the first one trains it, the others start from a copy of its pretrain/ folder (the loop resumes
from its final checkpoint; the copy differs only in the config's projector/encoder fields, which the text stage
does not read); the projector's kind changes the checkpoint's tree, so the linear variant pretrains its own. Writes <workdir>/results/vlm_study.json (every run's results) and <workdir>/figures/vlm_study.png
(reading and answering accuracy per variant, mean and range over seeds); docs/results/vlm.md has the table.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/vlm_study", "Output directory.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (model init, data order, eval problems).")
_VARIANTS = flags.DEFINE_list("variants", ["base", "no_stage1", "frozen", "causal", "linear"], "Variants to run.")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 500, "Text-pretraining steps of the LM.")
_STAGE = flags.DEFINE_integer("stage_steps", 500, "Steps of stage 1 and of stage 2.")
_PROBLEMS = flags.DEFINE_integer("problems_per_k", 32, "Held-out problems per K in each evaluation.")

VARIANTS = {
    "base": "",
    "linear": "projector=linear",
    "causal": "mask=causal",
    "frozen": "encoder=frozen",
    "no_stage1": "stage1=0",
}


def variant_config(name: str, seed: int):
    from configs.vlm import study

    arg = ",".join(filter(None, [VARIANTS[name], f"seed={seed}"]))
    config = study.get_config(arg)
    config.unlock()
    config.pretrain.update(steps=_PRETRAIN.value, lr=1e-2)
    if config.stage1.steps:
        config.stage1.steps = _STAGE.value
    config.stage2.steps = _STAGE.value
    config.train.progress = False
    config.eval.problems_per_k = _PROBLEMS.value
    config.lock()
    return config


def main(argv) -> None:
    del argv
    from experiments import vlm as vlm_exp

    workdir = _WORKDIR.value
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    out: dict = {"settings": dict(pretrain_steps=_PRETRAIN.value, stage_steps=_STAGE.value), "runs": {}}
    pretrained: dict = {}
    for seed in (int(s) for s in _SEEDS.value):
        for name in _VARIANTS.value:
            config = variant_config(name, seed)
            run_dir = os.path.join(workdir, f"{name}_s{seed}")
            key = (config.model.prefix_lm, config.model.projector, seed)
            if key in pretrained and not os.path.exists(os.path.join(run_dir, "pretrain")):
                shutil.copytree(pretrained[key], os.path.join(run_dir, "pretrain"))
            t0 = time.time()
            res = vlm_exp.run(config, run_dir)
            pretrained.setdefault(key, os.path.join(run_dir, "pretrain"))
            out["runs"][f"{name}_s{seed}"] = {
                "variant": name,
                "seed": seed,
                "wall_s": time.time() - t0,
                **res["stages"],
            }
            with open(os.path.join(workdir, "results", "vlm_study.json"), "w") as f:
                json.dump(out, f, indent=2)
            print(f"{name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    print(table(out))
    plot(out, os.path.join(workdir, "figures", "vlm_study.png"))


def _cell(runs, stage, mode, k, key):
    xs = [r[stage][mode][k][key] for r in runs if stage in r and mode in r[stage]]
    if not xs:
        return "-"
    return f"{sum(xs) / len(xs):.2f}" + (f" ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else "")


def table(out: dict) -> str:
    """Markdown: per variant, stage-1 and stage-2 reading (whole expression) and stage-2 answers by K."""
    runs = out["runs"].values()
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    ks = sorted({k for r in runs for s in ("stage1", "stage2") if s in r for k in r[s]["read"]})
    head = ["variant"] + [f"read K={k} (s1)" for k in ks] + [f"read K={k}" for k in ks] + [f"answer K={k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        cells = [_cell(rs, "stage1", "read", k, "exact") for k in ks]
        cells += [_cell(rs, "stage2", "read", k, "exact") for k in ks]
        cells += [_cell(rs, "stage2", "compute", k, "exact") for k in ks]
        lines.append("| " + " | ".join([v] + cells) + " |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = list(out["runs"].values())
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    ks = sorted({k for r in runs if "stage2" in r for k in r["stage2"]["read"]})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
    panels = [("stage2", "read", "char_accuracy", "reading, characters"), ("stage2", "read", "exact", "reading, whole")]
    panels.append(("stage2", "compute", "exact", "answer exact match"))
    width = 0.8 / max(len(variants), 1)
    for ax, (stage, mode, key, title) in zip(axes, panels):
        for i, v in enumerate(variants):
            vals = np.array([[r[stage][mode][k][key] for k in ks] for r in runs if r["variant"] == v and stage in r])
            if not vals.size:
                continue
            x = np.arange(len(ks)) + i * width
            ax.bar(x, vals.mean(0), width, label=v)
            ax.vlines(x, vals.min(0), vals.max(0), color="k", lw=1)
        ax.set_xticks(np.arange(len(ks)) + 0.4 - width / 2, [f"K={k}" for k in ks])
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
