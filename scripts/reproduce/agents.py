"""The agents study: topologies of role-trained Lumen LMs, two seeds, aggregated into a figure, a JSON and a table.

  .venv/bin/python -m scripts.reproduce.agents --workdir=runs/agents [--seeds=0,1] [--problems=128]

Each seed is `experiments.agents.run` on configs/agents/study.py in <workdir>/seed<s> (role training to the token
accuracy budgets, then every topology per budget; reruns resume training and replay finished runs from their
logs). Writes <workdir>/agents.json and <workdir>/agents.png; with --publish also docs/figures/agents.{png,json}.

Figure panels: (a) system accuracy vs the single agent's accuracy (one point per seed and budget, a line per
topology; the diagonal is "no gain"): where coordination pays and where it stops; (b) error-amplification factor
per topology; (c) planted-error propagation per topology; (d) debate accuracy gain over the single agent vs agents x
rounds; (e) accuracy with and without the MCP calculator; (f) FLOPs per solved problem.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

from configs.agents import study
from experiments import agents as agents_exp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def collect(results_by_seed: dict[int, dict]) -> list[dict]:
    """Flat rows: seed, budget, snapshot step, topology name and its metrics."""
    rows = []
    for seed, res in results_by_seed.items():
        for q, b in res["budgets"].items():
            for name, r in b["runs"].items():
                rows.append(
                    dict(
                        seed=seed,
                        budget=float(q),
                        step=b["snapshot"]["step"],
                        snapshot_token_accuracy=b["snapshot"]["token_accuracy"],
                        topology=name,
                        **r,
                    )
                )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per topology, mean over seeds and budgets of accuracy, amplification, propagation, FLOPs/solved."""
    names = list(dict.fromkeys(r["topology"] for r in rows))
    lines = [
        "| topology | budget | accuracy (seeds) | error amplification | planted-error propagation | "
        "GFLOPs / solved | failures |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    budgets = sorted({r["budget"] for r in rows})
    for q in budgets:
        for n in names:
            sel = [r for r in rows if r["topology"] == n and r["budget"] == q]
            if not sel:
                continue
            acc = " / ".join(f"{r['accuracy']:.3f}" for r in sel)
            amp = " / ".join(f"{r['amplification']:.2f}" for r in sel)
            prop = " / ".join(f"{r['propagation']:.2f}" if "propagation" in r else "-" for r in sel)
            fl = " / ".join(f"{r['flops_per_solved'] / 1e9:.3f}" for r in sel)
            fails = {}
            for r in sel:
                for k, v in r["failures"].items():
                    fails[k] = fails.get(k, 0) + v
            lines.append(f"| {n} | {q:g} | {acc} | {amp} | {prop} | {fl} | {fails or '-'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    main = [
        n
        for n in dict.fromkeys(r["topology"] for r in rows)
        if "+" not in n and not n.startswith("debate:") or n == "debate:3x2"
    ]
    single = {(r["seed"], r["budget"]): r["accuracy"] for r in rows if r["topology"] == "single"}
    for n in main:
        sel = sorted((r for r in rows if r["topology"] == n), key=lambda r: single[r["seed"], r["budget"]])
        ax[0, 0].plot([single[r["seed"], r["budget"]] for r in sel], [r["accuracy"] for r in sel], "o-", label=n)
    ax[0, 0].plot([0, 1], [0, 1], "k:", lw=1)
    ax[0, 0].axvline(0.45, color="grey", lw=0.8, ls="--")
    ax[0, 0].set(
        xlabel="single-agent accuracy (same snapshot, sampled)",
        ylabel="system accuracy",
        title="(a) gain vs base accuracy (dashed: the published ~45%)",
    )
    ax[0, 0].legend(fontsize=7)
    for k, (key, title) in enumerate(
        [
            ("amplification", "(b) error amplification (error / single's)"),
            ("propagation", "(c) planted wrong step reaching the answer"),
        ]
    ):
        a = ax[0, 1 + k]
        names = [n for n in main if any(key in r for r in rows if r["topology"] == n)]
        for j, q in enumerate(sorted({r["budget"] for r in rows})):
            vals = [
                np.mean([r[key] for r in rows if r["topology"] == n and r["budget"] == q and key in r]) for n in names
            ]
            a.bar(np.arange(len(names)) + 0.25 * j, vals, 0.25, label=f"budget {q:g}")
        a.set_xticks(np.arange(len(names)) + 0.25, names, rotation=30, fontsize=7)
        a.set_title(title)
        a.legend(fontsize=7)
    deb = sorted({r["topology"] for r in rows if r["topology"].startswith("debate:") and "+" not in r["topology"]})
    for q in sorted({r["budget"] for r in rows}):
        gains = [
            np.mean(
                [
                    r["accuracy"] - single[r["seed"], r["budget"]]
                    for r in rows
                    if r["topology"] == n and r["budget"] == q
                ]
            )
            for n in deb
        ]
        ax[1, 0].plot(deb, gains, "o-", label=f"budget {q:g}")
    ax[1, 0].axhline(0, color="k", lw=0.8)
    ax[1, 0].set(title="(d) debate gain over single vs agents x rounds", ylabel="accuracy gain")
    ax[1, 0].tick_params(axis="x", rotation=30, labelsize=7)
    ax[1, 0].legend(fontsize=7)
    tools = sorted({r["topology"][: -len("+tools")] for r in rows if r["topology"].endswith("+tools")})
    for j, (suffix, lab) in enumerate([("", "no tools"), ("+tools", "MCP calculator")]):
        vals = [np.mean([r["accuracy"] for r in rows if r["topology"] == n + suffix]) for n in tools]
        ax[1, 1].bar(np.arange(len(tools)) + 0.4 * j, vals, 0.4, label=lab)
    ax[1, 1].set_xticks(np.arange(len(tools)) + 0.2, tools)
    ax[1, 1].set(title="(e) with and without the MCP calculator (mean)")
    ax[1, 1].legend(fontsize=7)
    for n in main:
        sel = [r for r in rows if r["topology"] == n and np.isfinite(r["flops_per_solved"])]
        ax[1, 2].scatter([r["flops_per_solved"] for r in sel], [r["accuracy"] for r in sel], label=n, s=15)
    ax[1, 2].set(xscale="log", xlabel="FLOPs per solved problem", ylabel="accuracy", title="(f) cost")
    ax[1, 2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/agents")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--publish", action="store_true", help="copy the figure and JSON to docs/figures/")
    args = ap.parse_args(argv)
    t0 = time.time()
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        config = study.get_config(f"seed={seed},problems={args.problems}")
        results[seed] = agents_exp.run(config, os.path.join(args.workdir, f"seed{seed}"))
    rows = collect(results)
    out = {
        "command": ".venv/bin/python -m scripts.reproduce.agents " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s_this_call": time.time() - t0,  # a rerun replays finished runs from their logs
        "rows": rows,
    }
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "agents.json"), "w") as f:
        json.dump(out, f, indent=1)
    plot(rows, os.path.join(args.workdir, "agents.png"))
    print(table(rows))
    if args.publish:
        for ext in ("json", "png"):
            shutil.copy(
                os.path.join(args.workdir, f"agents.{ext}"), os.path.join(REPO, "docs", "figures", f"agents.{ext}")
            )


if __name__ == "__main__":
    main()
