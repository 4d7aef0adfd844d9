"""The memory study: accuracy per LongMemEval ability and tokens read per question, for every store, against history
length, with the rule reader and the trained LM answerer (docs/results/memory.md).

  .venv/bin/python -m scripts.reproduce.memory --workdir=runs/memory_study            (the full study, 12 stores, ~25 min)
  .venv/bin/python -m scripts.reproduce.memory --workdir=runs/memory_study --steps=12000  (the page's reader, ~37-42 min)
  .venv/bin/python -m scripts.reproduce.memory --workdir=runs/memory_rule --steps=0 --budget=256   (rule reader only)

It runs `experiments.memory.run` with `configs/memory/answerer.py` (train the answerer through the one loop,
resuming from --workdir, then the study over --lengths x --seeds x every store), copies
results/memory_study.json and the figures to --out, and prints the tables (mean over seeds) the results page uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from framework.memory.harness import ABILITIES


def tables(rows: list[dict]) -> str:
    """Markdown tables, one per reader: rows (store, history length), columns the abilities and tokens read."""
    out = []
    for reader in dict.fromkeys(r["reader"] for r in rows):
        rs = [r for r in rows if r["reader"] == reader]
        lines = [
            f"reader: **{reader}**",
            "",
            "| store | events | " + " | ".join(ABILITIES) + " | all | tokens read |",
            "|---|---:|" + "---:|" * (len(ABILITIES) + 2),
        ]
        for store in dict.fromkeys(r["store"] for r in rs):
            for n in sorted({r["n_events"] for r in rs if r["store"] == store}):
                cell = [r for r in rs if r["store"] == store and r["n_events"] == n]

                def mean(key, ab, cell=cell):
                    xs = [r[key][ab] for r in cell if r[key][ab] is not None]
                    return float(np.mean(xs)) if xs else None

                accs = [mean("accuracy", ab) for ab in ABILITIES + ("all",)]
                lines.append(
                    f"| {store} | {n} | "
                    + " | ".join("-" if a is None else f"{a:.2f}" for a in accs)
                    + f" | {mean('tokens_read', 'all'):.0f} |"
                )
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/memory_study")
    p.add_argument("--out", default="docs/results/memory")
    p.add_argument("--size", default="tiny")
    p.add_argument("--layers", type=int, default=4, help="the answerer's layers (0: the size's own)")
    p.add_argument("--budget", type=int, default=96, help="tokens of retrieved context a reader sees")
    p.add_argument("--steps", type=int, default=6000, help="answerer training steps (0: rule reader only)")
    p.add_argument("--lengths", default="10,30,100,300,1000,3000")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--decisions", default="greedy,scored", help="the LM reader's decoding rules (lm, lm_scored)")
    p.add_argument("--curriculum", default="500,3000", help="steps where one-variable, then plain lookups end")
    p.add_argument("--max_vars", type=int, default=3, help="variables in a plain lookup (1 to this many lines)")
    p.add_argument("--questions", type=int, default=20, help="questions per ability per ledger")
    p.add_argument("--context_weight", type=float, default=1.0, help="loss weight of the dialogue before answers")
    p.add_argument("--near", type=float, default=0.5, help="share of training examples among near-namesakes")
    p.add_argument("--short_conv", type=int, default=8, help="the answerer's causal convolution taps (0: none)")
    p.add_argument(
        "--table_only", action="store_true", help="print the tables of an existing --workdir (writes nothing to --out)"
    )
    args = p.parse_args(argv)
    result = os.path.join(args.workdir, "results", "memory_study.json")
    if not args.table_only:
        from configs.memory import answerer as answerer_config
        from experiments import memory as experiment

        lengths, seeds = args.lengths.replace(",", "/"), args.seeds.replace(",", "/")
        c1, c2 = (int(x) for x in args.curriculum.split(","))
        config = answerer_config.get_config(
            f"size={args.size},layers={args.layers},budget={args.budget},steps={args.steps},"
            f"lengths={lengths},seeds={seeds},decisions={args.decisions.replace(',', '/')},"
            f"curriculum1={c1},curriculum2={c2},max_vars={args.max_vars},context_weight={args.context_weight},"
            f"short_conv={args.short_conv},near={args.near}"
        )
        with config.unlocked():
            config.train.progress = False
            config.study.questions_per_ability = args.questions
        t0, c0 = time.time(), time.process_time()
        out = experiment.run(config, args.workdir)
        out["wall_seconds"], out["process_cpu_seconds"] = time.time() - t0, time.process_time() - c0
        with open(result, "w") as f:
            json.dump(out, f, indent=1)
    with open(result) as f:
        out = json.load(f)
    if not args.table_only:  # a finished run's results go to --out; reading an old run's tables writes nothing
        os.makedirs(args.out, exist_ok=True)
        shutil.copy(result, os.path.join(args.out, "memory_study.json"))
        figures = os.path.join(args.workdir, "figures")
        for name in sorted(os.listdir(figures)) if os.path.isdir(figures) else []:
            shutil.copy(os.path.join(figures, name), os.path.join(args.out, name))
    print(tables(out["rows"]))


if __name__ == "__main__":
    main()
