"""The default experiment: a small arithmetic LM, trained and scored by number of steps K.

COMMAND: python -m scripts.launch --config=configs/quickstart.py --workdir=runs/quickstart   (or `make quickstart`)
RUNTIME: ~4 min on a 2-core CPU.
EXPECT: per-step accuracy > 0.9; exact match falling with K (high at K=1, mid-range around K=4, low at K=8).
"""

from configs import common


def get_config(arg: str | None = None):
    del arg
    config = common.lm_experiment(size="small")
    config.train.steps = 1200
    config.train.checkpoint_every = 400
    config.eval.problems_per_k = 64
    config.lock()
    return config
