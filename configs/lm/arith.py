"""Decoder LM trained on modular-arithmetic chains; sizes tiny | small | base.

COMMAND: python -m scripts.launch --config=configs/lm/arith.py:size=small --workdir=runs/arith_small
RUNTIME: tiny ~1 min, small ~4 min, base ~25 min on a 2-core CPU (defaults below).
EXPECT: per-step accuracy high, chain exact-match falling with K (see README for measured numbers).
"""

from configs import common

_STEPS = {"tiny": 600, "small": 1200, "base": 3000}


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, size="small")
    config = common.lm_experiment(size=args.size)
    config.train.steps = _STEPS[args.size]
    config.train.checkpoint_every = max(config.train.steps // 4, 1)
    config.lock()
    return config
