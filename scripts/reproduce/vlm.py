"""The VLM study: a text-pretrained LM learns to read images (stage 1) and to compute from them (stage 2), over seeds.

  python -m scripts.reproduce.vlm --workdir=runs/vlm_study [--seeds=0,1] [--pretrain_steps=2500 --pretrain_until=0.9
      --pretrain_check_every=500 --pretrain_max_steps=5000 --stage1_steps=600 --stage2_steps=500]

Each LM is text-pretrained until it computes (`config.pretrain`'s stopping rule, experiments.vlm.next_pretrain_block):
pretrain_steps steps, then blocks of pretrain_check_every steps (each a warm restart of the lr) until the LM's
held-out answer exact match at the largest K reaches pretrain_until, or pretrain_max_steps.

Variants (configs/vlm/study.py arguments; every one uses the linear projector): base (prefix-LM mask, encoder
trained, stage 1 then stage 2 training projector + encoder + LM), lora (stage 2 trains the LM through rank-8 LoRA
adapters instead), frozen (the encoder never trained: the projector reads the random encoder's features), no_stage1
(stage 2 straight after the text pretraining), causal (causal mask throughout, its own causal pretraining), augment
(stage 1 alone on glyphs jittered inside their cells with pixel noise of std 0.3: reading under augmentation); mlp
(the 2-layer MLP projector, on request: --variants=base,mlp).
Each variant and seed runs `experiments.vlm.run` in <workdir>/<variant>_s<seed> (resumable). Work is shared, never
repeated: variants with the same mask, projector and seed start from a copy of the first one's pretrain/ folder, and
lora from a copy of base's stage1/ folder (the loop resumes from the final checkpoint; the copies differ only in
config fields the copied stage does not read); the pretrained LM is evaluated on text (the ceiling) once per LM.
Writes <workdir>/results/vlm_study.json (every run's results, wall and CPU seconds) and
<workdir>/figures/vlm_study.png (reading and answering per variant, mean and range over seeds, with the text ceiling
and the most-common-answer floor); docs/results/vlm.md has the table.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/vlm_study", "Output directory.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (model init, data order, eval problems).")
_VARIANTS = flags.DEFINE_list("variants", ["base", "lora", "frozen", "no_stage1", "causal", "augment"], "Variants.")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 2500, "Text-pretraining steps of the LM before its first check.")
_UNTIL = flags.DEFINE_float("pretrain_until", 0.9, "Held-out answer exact match (largest K) that ends pretraining.")
_CHECK_EVERY = flags.DEFINE_integer("pretrain_check_every", 500, "Steps between pretraining checks after the first.")
_MAX_PRETRAIN = flags.DEFINE_integer("pretrain_max_steps", 5000, "Cap on the text-pretraining steps.")
_STAGE1 = flags.DEFINE_integer("stage1_steps", 600, "Steps of stage 1 (reading).")
_STAGE2 = flags.DEFINE_integer("stage2_steps", 500, "Steps of stage 2 (reading and computing).")
_PROBLEMS = flags.DEFINE_integer("problems_per_k", 32, "Held-out problems per K in each evaluation.")

VARIANTS = {
    "base": "",
    "lora": "lora=8",
    "frozen": "encoder=frozen",
    "no_stage1": "stage1=0",
    "causal": "mask=causal",
    "augment": "augment=1",
    "mlp": "projector=mlp",  # not in the default list: the MLP projector (pretrains its own LM: another param tree)
}


def variant_config(name: str, seed: int):
    from configs.vlm import study

    config = study.get_config(",".join(filter(None, [VARIANTS[name], f"seed={seed}"])))
    config.unlock()
    config.pretrain.update(
        steps=_PRETRAIN.value, until_exact=_UNTIL.value, check_every=_CHECK_EVERY.value, max_steps=_MAX_PRETRAIN.value
    )
    if config.stage1.steps:
        config.stage1.steps = _STAGE1.value
    config.stage2.steps = 0 if name == "augment" else _STAGE2.value
    config.train.progress = False
    config.eval.problems_per_k = _PROBLEMS.value
    config.lock()
    return config


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _share(src: str | None, run_dir: str, stage: str) -> bool:
    """Copies a finished stage folder into `run_dir` (once); True when the run starts from it."""
    dst = os.path.join(run_dir, stage)
    if src is None:
        return False
    if not os.path.exists(dst):
        shutil.copytree(src, dst)
    return True


def main(argv) -> None:
    del argv
    from experiments import vlm as vlm_exp

    workdir = _WORKDIR.value
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    out: dict = {
        "settings": dict(
            pretrain_steps=_PRETRAIN.value,
            pretrain_until=_UNTIL.value,
            pretrain_check_every=_CHECK_EVERY.value,
            pretrain_max_steps=_MAX_PRETRAIN.value,
            stage1_steps=_STAGE1.value,
            stage2_steps=_STAGE2.value,
            problems_per_k=_PROBLEMS.value,
        ),
        "runs": {},
    }
    seeds = [int(s) for s in _SEEDS.value]
    path = os.path.join(workdir, "results", "vlm_study.json")
    if os.path.exists(path):  # runs of other seeds or variants under the same settings stay in the results
        old = json.load(open(path))
        if old.get("settings") == out["settings"]:
            out["runs"] = {
                n: r for n, r in old["runs"].items() if r["seed"] not in seeds or r["variant"] not in _VARIANTS.value
            }
    shared: dict = {}
    for seed in seeds:
        for name in _VARIANTS.value:
            config = variant_config(name, seed)
            run_dir = os.path.join(workdir, f"{name}_s{seed}")
            lm_key = (config.model.prefix_lm, config.model.projector, seed)
            read_key = (config.model.prefix_lm, seed, tuple(config.stage1.train), config.task.noise)
            reused = _share(shared.get(("pretrain", lm_key)), run_dir, "pretrain")
            if config.stage1.steps:
                _share(shared.get(("stage1", read_key)), run_dir, "stage1")
            if reused:
                config.unlock()
                config.eval.text_ceiling = False  # the same LM was evaluated on text by the run it comes from
                config.lock()
            t0, c0 = time.time(), _cpu_s()
            res = vlm_exp.run(config, run_dir)
            shared.setdefault(("pretrain", lm_key), os.path.join(run_dir, "pretrain"))
            if config.stage1.steps:
                shared.setdefault(("stage1", read_key), os.path.join(run_dir, "stage1"))
            stages = dict(res["stages"], pretrain_checks=res.get("pretrain_checks", []))
            if "pretrain" not in stages:  # the ceiling of the LM this run started from
                src = next(r for r in out["runs"].values() if r["lm_key"] == list(lm_key) and "pretrain" in r)
                stages["pretrain"] = src["pretrain"]
            out["runs"][f"{name}_s{seed}"] = {
                "variant": name,
                "seed": seed,
                "lm_key": list(lm_key),
                "wall_s": time.time() - t0,
                "cpu_s": _cpu_s() - c0,
                **stages,
            }
            with open(path, "w") as f:
                json.dump(out, f, indent=2)
            print(f"{name} seed {seed}: {time.time() - t0:.0f} s wall, {_cpu_s() - c0:.0f} CPU-s", flush=True)
    out = json.loads(json.dumps(out))  # K keys as strings, as in the runs kept from the results file
    print(table(out))
    plot(out, os.path.join(workdir, "figures", "vlm_study.png"))


def _cell(runs, stage, mode, k, key):
    xs = [r[stage][mode][k][key] for r in runs if stage in r and mode in r[stage]]
    if not xs:
        return "-"
    return f"{sum(xs) / len(xs):.2f}" + (f" ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else "")


def table(out: dict) -> str:
    """Markdown: per variant and K, reading (whole expression) and answer exact match after each stage, the final
    LM's answers given the text, and the floor; mean (min-max) over seeds."""
    runs = list(out["runs"].values())
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    ks = sorted({k for r in runs for k in r["pretrain"]["compute"]})
    cols = [
        ("stage1", "read", "exact", "read s1"),
        ("stage1", "compute", "exact", "answer s1"),
        ("stage2", "read", "exact", "read s2"),
        ("stage2", "compute", "exact", "answer s2"),
        ("stage2", "text_compute", "exact", "answer s2, text"),
        ("pretrain", "compute", "exact", "pretrained LM, text"),
        ("pretrain", "compute", "floor", "floor"),
    ]
    head = ["variant", "K"] + [c[3] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        for k in ks:
            cells = [_cell(rs, stage, mode, k, key) for stage, mode, key, _ in cols]
            lines.append("| " + " | ".join([v, str(k)] + cells) + " |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = list(out["runs"].values())
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    ks = sorted({k for r in runs for k in r["pretrain"]["compute"]})
    panels = [
        ("stage1", "read", "reading after stage 1 (whole expression)"),
        ("stage2", "read", "reading after stage 2"),
        ("stage1", "compute", "answer exact after stage 1"),
        ("stage2", "compute", "answer exact after stage 2"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4), sharey=True)
    width = 0.8 / max(len(variants), 1)
    x0 = np.arange(len(ks))
    for ax, (stage, mode, title) in zip(axes, panels):
        for i, v in enumerate(variants):
            vals = np.array(
                [[r[stage][mode][k]["exact"] for k in ks] for r in runs if r["variant"] == v and stage in r]
            )
            if not vals.size:
                continue
            x = x0 + i * width
            ax.bar(x, vals.mean(0), width, label=v, color=f"C{i}")  # one colour per variant in every panel
            ax.vlines(x, vals.min(0), vals.max(0), color="k", lw=1)
        if mode == "compute":  # the pretrained LMs given the text (mean over runs) and the most-common-answer floor
            for key, style, label in (("exact", "--", "pretrained LM, text"), ("floor", ":", "floor")):
                vals = np.array([[r["pretrain"]["compute"][k][key] for k in ks] for r in runs]).mean(0)
                ax.hlines(vals, x0 - width / 2, x0 + 0.8 - width / 2, colors="k", linestyles=style, label=label)
        ax.set_xticks(x0 + 0.4 - width / 2, [f"K={k}" for k in ks])
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1.02)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
