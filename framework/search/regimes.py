"""Regime map: where PRM-guided beam search beats best-of-N at equal FLOPs, and the diagnostics that say why.

Glossary: P problems, S pool samples per problem, N budget, M beam width, F FLOPs per problem.

`map_cell` studies one policy (one sampling temperature) with several scorers (PRMs of different quality: the oracle,
a noisy oracle, trained PRMs) on one problem set. Per seed it draws a pool of S samples per problem, from which
majority / best-of-N / weighted BoN, answer pass@N and gold-path pass@N are read at every N by subsampling; beam
search (width M) is re-run at each N of `beam_ns`. Each beam cell costs F FLOPs per problem (`SearchResults.flops`);
weighted BoN, BoN and majority are read at the same F by interpolating their per-problem curves in log FLOPs
(`diagnostics.interpolate_at_flops`), and the paired difference over problems (mean and standard error) is reported
for answer accuracy and for gold-path accuracy (the chosen trace is right on the gold path: the score a task without
chance hits would give). A budget past the pool's largest N is marked `extrapolated` (the reference is read at S).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from framework.models import lm
from framework.search import algorithms, diagnostics
from framework.tasks import arithmetic
from framework.verifiers import labels, metrics

REFERENCES = ("weighted_best_of_n", "best_of_n", "majority")


def _ms(x) -> list[float]:
    return list(diagnostics.mean_se(x))


def _pool_curves(policy, scorer, problems, pools, budgets, seeds, aggregation):
    """Per N: per-problem [P] values (mean over seeds) of every pool selector with this scorer, and FLOPs per N."""
    gold = [p.answer for p in problems]
    per_seed, gen, score = [], [], []
    for _seed, pool in zip(seeds, pools):
        S = len(pool.candidates[0])
        sc = scorer.score([p for p in problems for _ in range(S)], [c for cs in pool.candidates for c in cs])
        lines = [sc.scores[i * S : (i + 1) * S] for i in range(len(problems))]
        answers = [[algorithms.answer_of(p, c) for c in cs] for p, cs in zip(problems, pool.candidates)]
        flags = diagnostics.gold_flags(problems, pool.candidates)
        per_seed.append((lines, answers, flags))
        gen.append(float(pool.flops_per_problem(policy).mean()) / S)
        score.append(float(np.mean(lm.flops(scorer.cfg, sc.tokens, 0))) if getattr(scorer, "cfg", None) else 0.0)
    curves: dict[str, dict[int, np.ndarray]] = {}
    for n in budgets:
        subs = [
            diagnostics.subsample_pool(a, ls, f, gold, n, np.random.default_rng([s, n]), aggregation)
            for s, (ls, a, f) in zip(seeds, per_seed)
        ]
        for key in subs[0]:
            curves.setdefault(key, {})[n] = np.mean([x[key] for x in subs], axis=0)
    g, v = float(np.mean(gen)), float(np.mean(score))
    flops = {"majority": {n: n * g for n in budgets}}
    flops["best_of_n"] = flops["weighted_best_of_n"] = {n: n * (g + v) for n in budgets}
    return curves, flops, per_seed


def _prm_quality(per_seed, problems, pools, aggregation) -> dict:
    """Selection accuracy on the pools, step AUROC and ProcessBench F1 against gold labels."""
    sel = [diagnostics.selection_accuracy(ls, f, aggregation)["selection_accuracy"] for ls, _, f in per_seed]
    scores, gold = [], []
    for (ls, _, _), pool in zip(per_seed, pools):
        for p, cs, s in zip(problems, pool.candidates, ls):
            scores += list(s)
            gold += [labels.gold_labels(p, c) for c in cs]
    m = metrics.process_metrics(scores, gold)
    sel = [x for x in sel if np.isfinite(x)]  # NaN where no pool holds a gold-path sample
    return {
        "selection_accuracy": float(np.mean(sel)) if sel else float("nan"),
        "step_auroc": m.get("step_auroc"),
        "f1": m["f1"],
    }


def map_cell(
    policy,
    scorers: Mapping[str, object],
    problems: Sequence[arithmetic.Problem],
    *,
    pool_size: int,
    budgets: Sequence[int],
    beam_ns: Sequence[int],
    m: int,
    seeds: Sequence[int],
    groups: Mapping[str, np.ndarray] | None = None,
    aggregation: str = "last",
) -> dict:
    """One regime: pool curves and beam search per scorer, compared at equal FLOPs (see the module docstring).

    `groups` names subsets of the problems (bool [P] masks, e.g. by K) over which every comparison is repeated.
    Returns a JSON-ready dict: "pool" (answer and gold-path pass@N, majority), and per scorer its PRM quality,
    its (w)BoN curves and its beam cells with their equal-FLOPs differences, each as [mean, standard error].
    """
    budgets = sorted(n for n in budgets if n <= pool_size)
    if not budgets or any(n < m or n % m for n in beam_ns):
        raise ValueError(f"map_cell: budgets {budgets} must be <= pool_size and beam_ns {beam_ns} multiples of m={m}")
    groups = {"all": np.ones(len(problems), bool), **(groups or {})}
    pools = [algorithms.run("majority", policy, None, problems, n=pool_size, seed=s) for s in seeds]
    out = {"pool": {}, "scorers": {}, "groups": {k: int(v.sum()) for k, v in groups.items()}}
    for name, scorer in scorers.items():
        curves, flops, per_seed = _pool_curves(policy, scorer, problems, pools, budgets, seeds, aggregation)
        if not out["pool"]:
            out["pool"] = {
                key: {g: {n: _ms(curves[key][n][mask]) for n in budgets} for g, mask in groups.items()}
                for key in ("pass_at_n", "gold_pass_at_n", "majority")
            }
            out["pool"]["flops_majority"] = flops["majority"]
        cell = {"quality": _prm_quality(per_seed, problems, pools, aggregation), "flops": flops["weighted_best_of_n"]}
        for key in ("best_of_n", "weighted_best_of_n", "best_of_n_on_gold", "weighted_best_of_n_on_gold"):
            cell[key] = {g: {n: _ms(curves[key][n][mask]) for n in budgets} for g, mask in groups.items()}
        cell["beam"] = {}
        for n in beam_ns:
            runs = [algorithms.run("beam", policy, scorer, problems, n=n, m=m, seed=s, aggregation=aggregation)
                    for s in seeds]  # fmt: skip
            d = [diagnostics.search_diagnostics(r, problems) for r in runs]
            acc = np.mean([x["correct"] for x in d], axis=0)
            on_gold = np.mean([x["chosen_on_gold"] for x in d], axis=0)
            ceiling = np.mean([x["gold_ceiling"] for x in d], axis=0)
            F = float(np.mean([r.flops(policy, scorer if getattr(scorer, "cfg", None) else None) for r in runs]))
            F /= len(problems)
            ref = {}
            for key in REFERENCES:
                ns = budgets
                fl = [flops[key][k] for k in ns]
                ref[key] = diagnostics.interpolate_at_flops(fl, [curves[key][k] for k in ns], F)
                if key != "majority":
                    ref[key + "_on_gold"] = diagnostics.interpolate_at_flops(
                        fl, [curves[key + "_on_gold"][k] for k in ns], F
                    )
            row = {"flops": F, "extrapolated": F > flops["weighted_best_of_n"][budgets[-1]] * (1 + 1e-9)}
            row["wbon_n_at_same_flops"] = F / flops["weighted_best_of_n"][1]
            for g, mask in groups.items():
                row[g] = {
                    "accuracy": _ms(acc[mask]),
                    "on_gold": _ms(on_gold[mask]),
                    "own_gold_ceiling": _ms(ceiling[mask]),
                    **{f"minus_{k}": list(diagnostics.paired_difference(acc[mask], ref[k][mask])) for k in REFERENCES},
                    "on_gold_minus_weighted_best_of_n": list(
                        diagnostics.paired_difference(on_gold[mask], ref["weighted_best_of_n_on_gold"][mask])
                    ),
                    "reference_at_flops": {k: _ms(v[mask]) for k, v in ref.items()},
                }
            cell["beam"][n] = row
        out["scorers"][name] = cell
    return out


def beats(diff_se: Sequence[float], z: float = 2.0) -> int:
    """+1 if a [difference, standard error] pair is above zero by more than z standard errors, -1 if below, else 0."""
    d, se = diff_se
    if not np.isfinite(se) or se == 0:
        return int(np.sign(d)) if np.isfinite(d) and d != 0 and se == 0 else 0
    return 1 if d > z * se else -1 if d < -z * se else 0


def summary(cells: Mapping[str, dict], group: str = "all") -> str:
    """One line per (cell, scorer, beam N): PRM quality, the equal-FLOPs differences of beam search against weighted
    best-of-N in answer and in gold-path accuracy (mean +- SE; '*' beyond 2 SE), and the pool's ceilings."""
    head = (
        f"{'cell':<12} {'scorer':<9} {'sel.acc':>7} {'AUROC':>6} {'N':>3} {'~wBoN N':>7} "
        f"{'beam acc':>14} {'wBoN@F acc':>14} {'beam-wBoN':>15} {'beam gold':>14} {'wBoN@F gold':>14} "
        f"{'gold diff':>15} {'gold ceil':>9}"
    )
    lines = [f"problems: {group}", head]

    def ms(x):
        return f"{x[0]:.3f}+-{x[1]:.3f}"

    def diff(x):
        return f"{x[0]:+.3f}+-{x[1]:.3f}{'*' if beats(x) else ' '}"

    for cname, cell in cells.items():
        top = max(int(n) for n in cell["pool"]["gold_pass_at_n"][group])
        ceil = cell["pool"]["gold_pass_at_n"][group][top][0] if top in cell["pool"]["gold_pass_at_n"][group] else \
            cell["pool"]["gold_pass_at_n"][group][str(top)][0]  # fmt: skip
        for sname, sc in cell["scorers"].items():
            q = sc["quality"]
            for n, row in sc["beam"].items():
                r = row[group]
                ref = r["reference_at_flops"]
                lines.append(
                    f"{cname:<12} {sname:<9} {q['selection_accuracy']:>7.3f} {q['step_auroc'] or float('nan'):>6.3f} "
                    f"{int(n):>3} {row['wbon_n_at_same_flops']:>6.1f}{'+' if row['extrapolated'] else ' '} "
                    f"{ms(r['accuracy']):>14} {ms(ref['weighted_best_of_n']):>14} "
                    f"{diff(r['minus_weighted_best_of_n']):>15} {ms(r['on_gold']):>14} "
                    f"{ms(ref['weighted_best_of_n_on_gold']):>14} {diff(r['on_gold_minus_weighted_best_of_n']):>15} "
                    f"{ceil:>9.3f}"
                )
    lines.append("~wBoN N: the weighted-BoN budget of equal FLOPs ('+': past the pool, read at the pool's largest N)")
    return "\n".join(lines)


def figure(cells: Mapping[str, dict], path: str, group: str = "all") -> None:
    """Heat maps (cells x scorers) of beam search minus weighted best-of-N at equal FLOPs, answer and gold-path
    accuracy, one column of panels per beam N; each square is annotated with mean +- SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cells)
    scorers = list(next(iter(cells.values()))["scorers"])
    ns = sorted({int(n) for c in cells.values() for s in c["scorers"].values() for n in s["beam"]})
    fig, axes = plt.subplots(2, len(ns), figsize=(2.2 * len(scorers) * len(ns) + 1, 1.0 * len(names) * 2 + 2),
                             squeeze=False)  # fmt: skip
    for col, n in enumerate(ns):
        for row, (key, title) in enumerate(
            (
                ("minus_weighted_best_of_n", "answer accuracy"),
                ("on_gold_minus_weighted_best_of_n", "gold-path accuracy"),
            )
        ):
            ax = axes[row][col]
            val = np.full((len(names), len(scorers)), np.nan)
            for i, c in enumerate(names):
                for j, s in enumerate(scorers):
                    beam = cells[c]["scorers"].get(s, {}).get("beam", {})
                    cellrow = beam.get(n, beam.get(str(n)))
                    if cellrow is None:
                        continue
                    d, se = cellrow[group][key]
                    val[i, j] = d
                    ax.text(j, i, f"{d:+.2f}\n±{se:.2f}", ha="center", va="center", fontsize=7)
            ax.imshow(val, cmap="RdBu", vmin=-0.5, vmax=0.5, aspect="auto")
            ax.set_xticks(range(len(scorers)), scorers, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_title(f"beam N={n} - wBoN, equal FLOPs:\n{title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
