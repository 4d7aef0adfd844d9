"""Routing study: routers and cascades over three arithmetic LMs on the cost-accuracy plane, per difficulty mix.

  .venv/bin/python -m scripts.reproduce.routing --config=configs/routing/default.py --workdir=runs/routing
  .venv/bin/python -m scripts.reproduce.routing --config=configs/routing/default.py:small --workdir=runs/routing_small

Trains the models into <workdir>/models (a rerun loads them), builds one outcome table per difficulty mix into
<workdir>/results/table_<mix>.npz (a rerun reuses it), evaluates every router (fit on half of each table's queries,
scored on the other half) and every cascade, and writes <workdir>/results/routing.json, <workdir>/figures/*.png and
the summary printed here (<workdir>/results/summary.txt). `--publish` copies the figures and JSON to docs/figures/.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/routing/default.py", "Study config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/routing", "Output directory (resumed).")
_PUBLISH = flags.DEFINE_bool("publish", False, "Copy figures and results JSON to docs/figures/.")


def summarize(results: dict) -> str:
    """A fixed-width summary: models, each router's and cascade's metrics, the smallest model's share, transfer."""
    lines = []
    for mix, r in results["mixes"].items():
        lines.append(f"== mix {mix}")
        for m, (c, a) in r["models"].items():
            lines.append(f"  model {m:10s} mean FLOPs {c:10.4g}  accuracy {a:.3f}")
        lines.append(
            "  name             |   AUC | APGR | norm APGR | CPT50 | CPT80 |  AIQ | smallest share @95% | decision cost"
        )
        for kind in ("routers", "cascades"):
            for name, v in r[kind].items():
                m = v["metrics"]
                share = v.get("smallest_share", {}).get("share", float("nan"))
                cost = v.get("cost_share", float("nan"))
                lines.append(
                    f"  {kind[:-1] + ' ' + name:16s} | {m['auc']:.3f} | {m['apgr']:.2f} | "
                    f"{m['normalized_apgr']:9.2f} | {m['cpt50']:5.2f} | {m['cpt80']:5.2f} | "
                    f"{m['aiq']:.3f} | {share:.2f} | {cost:.2%}"
                )
    lines.append("== transfer (normalized APGR; router fit on one mix, scored on another)")
    for key, m in results["transfer"].items():
        lines.append(f"  {key:28s} {m.get('normalized_apgr', float('nan')):6.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    import logging

    from experiments import routing

    logging.getLogger("absl").setLevel(logging.WARNING)

    results = routing.run(_CONFIG.value, _WORKDIR.value)
    text = summarize(results)
    print(text)
    with open(os.path.join(_WORKDIR.value, "results", "summary.txt"), "w") as f:
        f.write(text + "\n")
    if _PUBLISH.value:
        os.makedirs("docs/figures", exist_ok=True)
        for name in [*results["mixes"], "share"]:
            shutil.copy(os.path.join(_WORKDIR.value, "figures", f"routing_{name}.png"), "docs/figures/")
        with open("docs/figures/routing.json", "w") as f:
            json.dump({k: v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
