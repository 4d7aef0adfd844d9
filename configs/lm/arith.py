"""Decoder LM trained on mod-100 arithmetic chains (two-digit numbers, K = 1..8, ops + - *); sizes tiny|small|base.

COMMAND: .venv/bin/python -m scripts.launch --config=configs/lm/arith.py:size=small --workdir=runs/arith_small
RUNTIME (2-core CPU, measured step times): tiny ~0.22 s/step, small ~0.4-0.8 s/step, base ~6-10 s/step; these
  runs are for a workstation or an accelerator more than for a laptop.
EXPECT: the mod-100 task is much harder to learn than the quickstart's mod-10 one: the tiny model reaches ~0.68
  token accuracy after 1000 steps and needs several thousand more before its greedy chains become right. The
  trained-to-convergence numbers per size are not measured yet.
"""

from configs import common

_STEPS = {"tiny": 6000, "small": 6000, "base": 10000}


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, size="small")
    config = common.lm_experiment(size=args.size)
    config.train.update(steps=_STEPS[args.size], batch_size=32, seq_len=112, lr=1e-2 if args.size == "tiny" else 3e-3)
    config.train.checkpoint_every = 1000
    config.lock()
    return config
