"""KTO on unpaired rows in the study's setting: the arithmetic pairs unpaired (gold traces desirable, one-corrupted-step
traces undesirable), 32 rows a step (the completions of 16 pairs, as the paired kinds see), the SFT policy as the
frozen reference; z0 is the batch's mismatched-prompt KL estimate (detached, clamped >= 0).

COMMAND: .venv/bin/python -m scripts.launch --config=configs/preference/kto.py --workdir=runs/pref_kto
RUNTIME: ~6-8 min on a 2-core CPU (SFT ~800 steps, then 150 steps and the evaluation).
EXPECT: the step-1 loss is 0.5 (policy = reference, z0 = 0); train/kl, train/rewards/{chosen,rejected,margins} and
  train/count/{chosen,rejected} logged; at lr 1e-4 on seed 1 held-out reward accuracy ~0.82 and greedy exact match
  slightly below the SFT policy's (0.36 vs 0.375); the study's tuned LR is 1e-5 (docs/results/preference.md).
"""

from configs import common
from configs.preference import study


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, seed=1, lr=1e-4, desirable_weight=1.0, undesirable_weight=1.0)
    config = study.get_config(f"kind=kto,seed={args.seed},lr={args.lr}")
    config.unlock()
    config.train.batch_size *= 2  # rows: each pair gives two
    config.pref.update(desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
    config.lock()
    return config
