"""One DPO-family kind on arithmetic pairs: the study's setting (configs/preference/study.py: the tiny LM SFT'd on
mod-10 chains, K = 1..5, to held-out token accuracy 0.95, then 150 preference steps on pairs of the gold trace vs
the SFT policy's own wrong completion). Any kind via `:kind=...`.

COMMAND: .venv/bin/python -m scripts.launch --config=configs/preference/dpo.py:kind=sigmoid --workdir=runs/pref_dpo
RUNTIME: ~2-3 min on a 2-core CPU (SFT ~800 steps, then 150 steps and the evaluation; 87 CPU-s measured).
EXPECT (seeds 1-2, docs/results/preference.md): held-out reward accuracy ~0.7 for the DPO-type kinds; at this LR
  (1e-4) held-out greedy exact match below the SFT policy's for every kind but orpo (and sft), which raise it.
"""

from configs import common
from configs.preference import study


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, kind="sigmoid", seed=1, lr=1e-4)
    return study.get_config(f"kind={args.kind},seed={args.seed},lr={args.lr}")
