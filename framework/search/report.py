"""Figures (PNG) and tables (JSON, text) of a test-time scaling study (`experiments.tts`)."""

from __future__ import annotations

import json
import os

import numpy as np

LABELS = {
    "majority": "majority vote",
    "best_of_n": "best-of-N",
    "weighted_best_of_n": "weighted best-of-N",
    "beam": "beam search",
    "dvts": "DVTS",
    "lookahead": "lookahead search",
    "pass_at_n": "pass@N (ceiling)",
    "gold_pass_at_n": "gold-path pass@N (PRM ceiling)",
}


def label(name: str) -> str:
    """Legend text of a strategy name ("revision_r4" = N/4 chains, each with 3 samples' worth of revisions)."""
    if name.startswith("revision_r"):
        r = int(name[len("revision_r") :])
        return "revision, parallel only" if r == 1 else f"revision, serial:parallel {r - 1}:1"
    base, _, m = name.partition("_m")
    if m.isdigit() and base in LABELS:
        return f"{LABELS[base]} (M={m})"
    return LABELS.get(name, name)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(d: dict) -> tuple[list[int], list[float]]:
    ns = sorted(int(n) for n in d)
    return ns, [d[n] if n in d else d[str(n)] for n in ns]


def _style(name: str) -> dict:
    return dict(ls="--", color="gray") if name == "pass_at_n" else {}


def accuracy_vs_n(ax, scaling: dict) -> None:
    """Accuracy vs N per strategy, with pass@N, the policy's greedy and the bigger model's greedy accuracy."""
    se = scaling.get("stderr", {})
    for name, d in scaling["accuracy"].items():
        ns, acc = _series(d)
        err = _series(se[name])[1] if name in se else None
        ax.errorbar(ns, acc, yerr=err, marker="o", capsize=2, label=label(name), **_style(name))
    gold = scaling.get("ceilings", {}).get("gold_pass_at_n")
    if gold:
        ns, acc = _series(gold)
        ax.plot(ns, acc, ls="--", color="k", label="gold-path pass@N (PRM ceiling)")
    ax.axhline(scaling["greedy"]["accuracy"], color="k", lw=1, ls=":", label="greedy")
    ax.axhline(
        scaling["bigger_model_greedy"]["accuracy"], color="tab:brown", lw=1, ls="-.", label="bigger model, greedy"
    )
    ax.set(xscale="log", xlabel="generation budget N", ylabel="answer accuracy", ylim=(-0.02, 1.02))
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)


def write(workdir: str, results: dict) -> None:
    """Writes results/*.json and figures/*.png into `workdir`."""
    plt = _plt()
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    for key in ("scaling", "coverage", "compute_optimal", "compute_optimal_flops", "compute_optimal_flops_gold_path",
                "label_sources"):  # fmt: skip
        if key in results:
            with open(os.path.join(workdir, "results", f"{key}.json"), "w") as f:
                json.dump(results[key], f, indent=1, default=float)
    with open(os.path.join(workdir, "results", "run.json"), "w") as f:
        json.dump(
            {
                k: results.get(k)
                for k in (
                    "seconds",
                    "timings",
                    "timings_verifiers",
                    "cpu_seconds",
                    "compile_seconds",
                    "search_seconds",
                    "machine",
                )
            },
            f,
            indent=1,
            default=float,
        )
    sc = results["scaling"]

    fig, ax = plt.subplots(figsize=(6, 4))
    accuracy_vs_n(ax, sc)
    ax.set_title(f"accuracy vs N ({sc['problems']} problems, K={sc['num_steps'][0]}..{sc['num_steps'][1]})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", "accuracy_vs_n.png"), dpi=120)
    plt.close(fig)

    if sc.get("on_gold_path"):
        fig, ax = plt.subplots(figsize=(6, 4))
        se = sc.get("stderr_on_gold_path", {})
        for name, d in sc["on_gold_path"].items():
            ns, acc = _series(d)
            # Results without stored SEs get sqrt(p(1-p)/P): an upper bound for values averaged over seeds.
            err = _series(se[name])[1] if name in se else [np.sqrt(a * (1 - a) / sc["problems"]) for a in acc]
            ax.errorbar(ns, acc, yerr=err, marker="o", capsize=2, label=label(name))
        ns, acc = _series(sc["ceilings"]["gold_pass_at_n"])
        ax.plot(ns, acc, ls="--", color="k", label="gold-path pass@N (PRM ceiling)")
        ax.set(xlabel="generation budget N", ylabel="chosen trace right on the gold path", ylim=(-0.02, 1.02))
        ax.set_xscale("log", base=2)
        ax.set_title(f"gold-path accuracy vs N ({sc['problems']} problems)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "figures", "gold_path_vs_n.png"), dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in sc["flops_per_problem"].items():
        if name == "pass_at_n":
            continue
        ns, fl = _series(d)
        se = sc.get("stderr", {}).get(name)
        ax.errorbar(
            fl,
            [sc["accuracy"][name].get(n, sc["accuracy"][name].get(str(n))) for n in ns],
            yerr=None if se is None else [se.get(n, np.nan) for n in ns],
            marker="o",
            capsize=2,
            label=label(name),
        )
    for key, marker, text in (("greedy", "s", "greedy"), ("bigger_model_greedy", "*", "bigger model, greedy")):
        ax.scatter([sc[key]["flops_per_problem"]], [sc[key]["accuracy"]], marker=marker, s=80, zorder=3, label=text)
    ax.set(
        xscale="log",
        xlabel="FLOPs per problem (lm.flops: prefill + decode, policy + verifier)",
        ylabel="answer accuracy",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", "accuracy_vs_flops.png"), dpi=120)
    plt.close(fig)

    for kind in sc["accuracy_by_bin"]:
        bins = sorted({int(b) for d in sc["accuracy_by_bin"][kind].values() for v in d.values() for b in v})
        fig, axes = plt.subplots(1, len(bins), figsize=(3 * len(bins), 3), sharey=True, squeeze=False)
        for ax, b in zip(axes[0], bins):
            se = sc.get("stderr_by_bin", {}).get(kind, {})
            for name, d in sc["accuracy_by_bin"][kind].items():
                ns = sorted(int(n) for n in d)
                err = [se[name][n].get(b, np.nan) for n in ns] if name in se else None
                ax.errorbar(ns, [d[n].get(b, np.nan) for n in ns], yerr=err, marker=".", capsize=2,
                            label=label(name), **_style(name))  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set(title=f"bin {b}", xlabel="N", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy")
        axes[0][-1].legend(fontsize=6)
        fig.suptitle(f"accuracy by difficulty ({kind} bins: 1 = easiest)")
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "figures", f"accuracy_by_difficulty_{kind}.png"), dpi=110)
        plt.close(fig)

    at_flops = results.get("compute_optimal_flops") or {}
    fig, axes = plt.subplots(1, 2 if at_flops else 1, figsize=(10 if at_flops else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    for kind, d in results["compute_optimal"].items():
        ns = sorted(int(n) for n in d)
        ax.plot(ns, [d[n]["accuracy"] for n in ns], marker="o", label=f"compute-optimal ({kind} bins)")
    d = next(iter(results["compute_optimal"].values()))
    ns = sorted(int(n) for n in d)
    ax.plot(ns, [d[n]["bon"] for n in ns], marker="s", ls="--", label="weighted best-of-N")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="N", ylabel="accuracy (evaluation half)", ylim=(-0.02, 1.02), title="per N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if at_flops:
        ax = axes[0][1]
        n_eval = max(1, round(sc["problems"] * (1 - results.get("selection_fraction", 0.5))))

        def err(d, ns, key):
            # The stored SE over evaluation problems, else sqrt(p(1-p)/n): an upper bound for seed-averaged values.
            return [d[n].get(f"{key}_se", np.sqrt(max(d[n][key] * (1 - d[n][key]), 0) / n_eval)) for n in ns]

        for kind, d in at_flops.items():
            ns = sorted(int(n) for n in d)
            ax.errorbar([d[n]["flops"] for n in ns], [d[n]["accuracy"] for n in ns], yerr=err(d, ns, "accuracy"),
                        marker="o", capsize=2, label=f"compute-optimal ({kind} bins)")  # fmt: skip
        d = next(iter(at_flops.values()))
        ns = sorted(int(n) for n in d)
        for ref, marker in (("weighted_best_of_n", "s"), ("best_of_n", "^"), ("majority", "v")):
            if ref in d[ns[0]]:
                ax.errorbar([d[n]["flops"] for n in ns], [d[n][ref] for n in ns], yerr=err(d, ns, ref),
                            marker=marker, ls="--", capsize=2, label=label(ref))  # fmt: skip
        ax.set(
            xscale="log",
            xlabel="FLOPs per problem (budget = weighted BoN at N)",
            ylim=(-0.02, 1.02),
            title="at equal FLOPs",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("compute-optimal vs best-of-N (chosen per difficulty bin on a selection half)")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", "compute_optimal.png"), dpi=120)
    plt.close(fig)

    revs = sorted((n for n in sc["accuracy"] if n.startswith("revision_r")), key=lambda n: int(n[len("revision_r") :]))
    if revs:
        by_bin = sc["accuracy_by_bin"]["oracle"]
        common = sorted(set.intersection(*[{int(n) for n in by_bin[r]} for r in revs]))
        n_top = common[-1] if common else None
        if n_top is not None:
            bins = sorted(by_bin[revs[0]][n_top])
            fig, ax = plt.subplots(figsize=(5, 3.5))
            width = 0.8 / len(revs)
            for i, r in enumerate(revs):
                se = sc.get("stderr_by_bin", {}).get("oracle", {}).get(r, {}).get(n_top, {})
                ax.bar(np.arange(len(bins)) + i * width, [by_bin[r][n_top][b] for b in bins], width, label=label(r),
                       yerr=[se.get(b, np.nan) for b in bins] if se else None, capsize=2)  # fmt: skip
            ax.set_xticks(np.arange(len(bins)) + 0.4 - width / 2, [f"bin {b}" for b in bins])
            ax.set(ylabel="accuracy", ylim=(0, 1.02), title=f"serial vs parallel at N={n_top} (oracle bins)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(workdir, "figures", "serial_vs_parallel.png"), dpi=120)
            plt.close(fig)

    cov = results["coverage"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(cov["k"], cov["coverage"], "o", label="pass@k (unbiased, from the pool)")
    if np.isfinite(cov["fit"]["a"]):
        ks = np.geomspace(1, max(cov["k"]), 50)
        ax.plot(
            ks,
            np.exp(cov["fit"]["a"] * ks ** cov["fit"]["b"]),
            "-",
            label=f"exp({cov['fit']['a']:.2f} k^{cov['fit']['b']:.2f})",
        )
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="coverage", ylim=(-0.02, 1.02), title="coverage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", "coverage.png"), dpi=120)
    plt.close(fig)

    table = results["label_sources"]
    names = list(table)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    keys = (("f1", "ProcessBench F1"), ("step_auroc", "step AUROC"), ("selection_accuracy", "selection accuracy"))
    for i, (key, text) in enumerate(keys):
        ax.bar(x + (i - 1.5) * 0.2, [table[s].get(key, np.nan) for s in names], 0.2, label=text)
    ax.bar(x + 0.3, [table[s]["bon"]["last"]["weighted_best_of_n"] for s in names], 0.2, label="weighted BoN acc")
    ax.set_xticks(x, names)
    ax.set(ylim=(0, 1.02), title="PRM label sources")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", "label_sources.png"), dpi=120)
    plt.close(fig)


def _int_keys(obj):
    """JSON's string keys back to ints where they are ints (budgets N, difficulty bins), recursively."""
    if isinstance(obj, dict):
        return {(int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): _int_keys(v) for k, v in obj.items()}
    return obj


def load(workdir: str) -> dict:
    """The results dict of a finished study from its `results/*.json` (what `write` and `summary` read)."""
    out = {}
    for key in ("scaling", "coverage", "compute_optimal", "compute_optimal_flops", "compute_optimal_flops_gold_path",
                "label_sources", "run"):  # fmt: skip
        path = os.path.join(workdir, "results", f"{key}.json")
        if os.path.exists(path):
            with open(path) as f:
                out[key] = _int_keys(json.load(f))
    out.update(out.pop("run", {}))
    return out


def timing_summary(results: dict) -> str:
    """Seconds per stage (wall, process CPU, compile) and the verifier sub-stages, one line each."""
    out = []
    for key, text in (
        ("timings", "seconds per stage"),
        ("cpu_seconds", "CPU seconds per stage"),
        ("compile_seconds", "compile seconds per stage"),
        ("timings_verifiers", "verifier sub-stages"),
    ):
        out.append(f"{text}: " + str({k: round(v, 1) for k, v in (results.get(key) or {}).items()}))
    return "\n".join(out)


def summary(results: dict) -> str:
    """Plain-text tables: accuracy and FLOPs per problem vs N per strategy, the label-source table, and
    compute-optimal at equal FLOPs."""
    sc = results["scaling"]
    ns = sc["budgets"]

    def row(name, d, fmt="{:<8.3f}", width=8):
        d = {int(k): v for k, v in d.items()}
        return name[:19].ljust(20) + "".join(fmt.format(d[n]) if n in d else " " * width for n in ns)

    lines = ["strategy".ljust(20) + "".join(f"N={n:<6d}" for n in ns)]
    for name, d in sc["accuracy"].items():
        lines.append(row(label(name), d))
    if "ceilings" in sc:
        lines.append(row("gold-path pass@N", sc["ceilings"]["gold_pass_at_n"]))
        lines.append("")
        lines.append("standard error over problems (answer accuracy)")
        for name, d in sc["stderr"].items():
            lines.append(row(label(name), d))
        lines.append("")
        lines.append("gap to gold-path pass@N (ceiling - accuracy; < 0: right answers through wrong processes)")
        for name, d in sc["gap_to_gold_ceiling"].items():
            lines.append(row(label(name), d, "{:<+8.3f}"))
        lines.append("")
        lines.append("chosen trace on the gold path")
        for name, d in sc["on_gold_path"].items():
            lines.append(row(label(name), d))
    big = sc["bigger_model_greedy"]
    lines.append(
        f"greedy {sc['greedy']['accuracy']:.3f} at {sc['greedy']['flops_per_problem']:.3g} FLOPs; "
        f"bigger model greedy {big['accuracy']:.3f} at {big['flops_per_problem']:.3g} FLOPs (per problem)"
    )
    lines.append("")
    lines.append("FLOPs per problem".ljust(20) + "".join(f"N={n:<8d}" for n in ns))
    for name, d in sc["flops_per_problem"].items():
        if name != "pass_at_n":
            lines.append(label(name)[:19].ljust(20) + "".join(f"{d[n]:<10.3g}" if n in d else " " * 10 for n in ns))
    lines.append("")
    lines.append(
        "source        F1     acc_flawed acc_correct AUROC  sel.acc sel.acc(held) BoN(last) wBoN(last) wBoN(min) "
        "wBoN(prod)"
    )
    for s, m in results["label_sources"].items():
        b = m["bon"]
        lines.append(
            f"{s:<13} {m['f1']:.3f}  {m['acc_flawed']:.3f}      {m['acc_correct']:.3f}       {m['step_auroc']:.3f}  "
            f"{m.get('selection_accuracy', np.nan):.3f}   {m.get('selection_accuracy_heldout', np.nan):.3f}         "
            f"{b['last']['best_of_n']:.3f}     {b['last']['weighted_best_of_n']:.3f}      "
            f"{b['min']['weighted_best_of_n']:.3f}     {b['product']['weighted_best_of_n']:.3f}"
        )
    lines += by_bin_lines(sc)
    lines += prm_vs_bigger_lines(sc)
    for key, score in (("compute_optimal_flops", "answer"), ("compute_optimal_flops_gold_path", "gold-path")):
        lines += _optimal_lines(results.get(key) or {}, score)
    return "\n".join(lines)


def _optimal_lines(at_flops: dict, score: str) -> list[str]:
    lines = []
    for kind, d in at_flops.items():
        lines.append("")
        lines.append(f"compute-optimal at equal FLOPs ({kind} bins; evaluation half; {score} accuracy)")
        lines.append("N    FLOPs      optimal  wBoN     BoN      majority wBoN FLOPs to match  chosen per bin")
        for n in sorted(d, key=int):
            r = d[n]
            match = r.get("weighted_best_of_n_flops_to_match", float("nan"))
            ratio = match / r["flops"] if np.isfinite(match) else float("inf")
            lines.append(
                f"{int(n):<4d} {r['flops']:<10.3g} {r['accuracy']:<8.3f} {r.get('weighted_best_of_n', np.nan):<8.3f} "
                f"{r.get('best_of_n', np.nan):<8.3f} {r.get('majority', np.nan):<8.3f} "
                f"{'never' if not np.isfinite(ratio) else f'{ratio:.2g}x':<17} "
                + " ".join(f"{b}:{c}" for b, c in sorted(r["chosen"].items(), key=lambda x: int(x[0])))
            )
    return lines


def by_bin_lines(sc: dict, kind: str = "oracle") -> list[str]:
    """Accuracy +- standard error per difficulty bin (1 = easiest) at each configuration's largest N, and the
    chosen trace's gold-path rate."""
    acc, se, gold = (sc.get(f"{k}_by_bin", {}).get(kind) for k in ("accuracy", "stderr", "on_gold_path"))
    if not acc:
        return []
    lines = ["", f"by difficulty ({kind} bins, 1 = easiest): answer accuracy +- SE [gold-path rate] at the largest N"]
    for name, d in acc.items():
        n = max(d, key=int)
        cells = []
        for b in sorted(d[n], key=int):
            g = (gold or {}).get(name, {}).get(n, {}).get(b)
            cells.append(f"{d[n][b]:.2f}+-{se[name][n][b]:.2f}" + (f" [{g:.2f}]" if g is not None else ""))
        lines.append(f"{label(name)[:19]:<20}N={int(n):<4d} " + "  ".join(cells))
    return lines


def prm_vs_bigger_lines(sc: dict) -> list[str]:
    """Policy + PRM against the bigger model, greedy: inference FLOPs per problem, training FLOPs, and the number
    of problems after which the total (training + inference) of each is equal."""
    tf, big = sc.get("training_flops") or {}, sc["bigger_model_greedy"]
    if not tf.get("judge") or not tf.get("policy"):
        return []
    small = tf["policy"] + (tf.get("prm_fit") or 0.0) + (tf.get("prm_traces") or 0.0)
    lines = ["", "policy + PRM vs the bigger model (greedy), FLOPs"]
    lines.append(
        f"training: policy {tf['policy']:.3g} + PRM fit {tf.get('prm_fit') or 0:.3g} + PRM traces "
        f"{tf.get('prm_traces') or 0:.3g} = {small:.3g}; bigger model {tf['judge']:.3g}"
    )
    lines.append(f"bigger model greedy: {big['accuracy']:.3f} at {big['flops_per_problem']:.3g} per problem")
    for name in ("weighted_best_of_n", "beam", "majority"):
        fl, acc = sc["flops_per_problem"].get(name, {}), sc["accuracy"].get(name, {})
        within = [n for n in fl if n in acc and fl[n] <= big["flops_per_problem"] * (1 + 1e-9)]
        if not within:
            lines.append(f"{label(name)}: every N costs more per problem than the bigger model")
            continue
        n = max(within, key=lambda k: fl[k])
        extra = fl[n] - big["flops_per_problem"]
        # Totals equal after Q problems: small + Q * fl = big_train + Q * big_inf.
        q = (tf["judge"] - small) / extra if extra < 0 else float("inf")
        lines.append(
            f"{label(name)} at N={int(n)}: {acc[n]:.3f} at {fl[n]:.3g} per problem; totals equal after "
            + (f"{q:.3g} problems" if np.isfinite(q) and q > 0 else "never (cheaper in both)" if q <= 0 else "never")
        )
    return lines
