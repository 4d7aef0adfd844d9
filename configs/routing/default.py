"""Routing study: three arithmetic LMs of clearly different size and skill, routers and cascades over them.

COMMAND: python -m scripts.reproduce.routing --config=configs/routing/default.py --workdir=runs/routing
RUNTIME: ~20-30 min on a 2-core CPU (three models trained on the mod-10 task, then three outcome tables of
  `study.queries` problems with 4 self-consistency samples per (query, model)); `configs/routing/default.py:small`
  is the reduced run (~10 min: fewer training steps and queries).
EXPECT: accuracy rises with the model's size and steps; the oracle's curve bounds every router's; the random router
  lies near the line between the models; the learned routers and the cascades sit between the two. The share of
  calls the smallest model can take at 95% of the largest model's accuracy falls as the mix gets harder.
"""

import ml_collections

from configs.serve import common


def get_config(arg: str | None = None):
    if arg not in (None, "", "small"):
        raise ValueError(f"configs/routing/default.py: argument {arg!r}; expected nothing or 'small'")
    small = arg == "small"
    config = ml_collections.ConfigDict()
    config.experiment = "routing"
    config.seed = 0
    config.task = ml_collections.ConfigDict(dict(modulus=10, num_steps=(1, 8)))
    f = 0.5 if small else 1.0
    config.models = ml_collections.ConfigDict(
        {
            "xs": common.model("arith-xs", 32, 1, train_steps=int(300 * f), lr=1e-2),
            "s": common.model("arith-s", 64, 2, train_steps=int(700 * f), lr=3e-3),
            "m": common.model("arith-m", 128, 2, train_steps=int(1200 * f), lr=3e-3),
        }
    )
    config.routers = ml_collections.ConfigDict(
        dict(names="mf,knn,hidden,difficulty,random,oracle", thresholds=(0.5,), table_problems=128)
    )
    config.study = ml_collections.ConfigDict(
        dict(
            queries=300 if small else 800,
            samples=2 if small else 4,
            keep_accuracy=0.95,
            mixes=ml_collections.ConfigDict(dict(easy=(1, 3), uniform=(1, 8), hard=(5, 8))),
        )
    )
    config.lock()
    return config
