"""Routing study: three arithmetic LMs of clearly different size and skill, routers and cascades over them.

COMMAND: python -m scripts.reproduce.routing --config=configs/routing/default.py --workdir=runs/routing
RUNTIME: ~15-25 min on a quiet 2-core CPU (three models and the router's probe LM trained on the mod-10 task, ~4
  CPU-minutes; then four outcome tables of `study.queries` problems with 4 self-consistency samples per (query,
  model)); `configs/routing/default.py:small` is the reduced run (fewer queries and samples, same models).
EXPECT: arith-xs (d32, 1 layer) answers chains of 1-2 steps and guesses beyond; arith-s (d32, 2 layers) is right on
  a share that falls slowly with the step count; arith-m (d64, 2 layers) is right on nearly every chain. The oracle's
  curve bounds every router's; the share of calls the smallest model can take at 95% of the largest model's accuracy
  falls as the mix gets harder. The hidden-state router reads a d8 one-layer probe LM: its decision costs < 2% of
  arith-xs's generation.
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
    config.models = ml_collections.ConfigDict(
        {
            "xs": common.model("arith-xs", 32, 1, train_steps=1500, lr=1e-2),
            "s": common.model("arith-s", 32, 2, train_steps=1500, lr=1e-2),
            "m": common.model("arith-m", 64, 2, train_steps=1500, lr=5e-3),
        }
    )
    config.routers = ml_collections.ConfigDict(
        dict(
            names="mf,knn,hidden,difficulty,random,oracle",
            thresholds=(0.5,),
            table_problems=128,
            # The hidden-state router reads this probe LM (8 wide, 1 layer): a prefill of it costs ~1.5% of the
            # smallest model's generation, where reading arith-xs itself costs ~25%.
            probe=common.model("arith-probe", 8, 1, train_steps=600, lr=1e-2, heads=2, d_ff=16),
            probe_layers=None,
        )
    )
    config.study = ml_collections.ConfigDict(
        dict(
            queries=300 if small else 800,
            samples=2 if small else 4,
            keep_accuracy=0.95,
            mixes=ml_collections.ConfigDict(
                dict(easy=(1, 2), mixed=(1, 4), uniform=(1, 8), hard=(5, 8)),
            ),
        )
    )
    config.lock()
    return config
