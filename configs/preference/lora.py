"""DPO with LoRA adapters in the study's setting: the reference is the base model with the adapters at their zero
init (the same frozen weights: no second copy).

COMMAND: .venv/bin/python -m scripts.launch --config=configs/preference/lora.py --workdir=runs/pref_lora
RUNTIME: ~6-8 min on a 2-core CPU.  EXPECT: only adapters in the checkpoints; the step-1 loss is log 2 (policy =
  reference). Quality figures for the LoRA variant are not measured yet.
"""

from configs import common
from configs.preference import study


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, kind="sigmoid", rank=8, lr=1e-3)
    config = study.get_config(f"kind={args.kind},lr={args.lr}")
    config.unlock()
    config.pref.lora_rank = args.rank
    config.lock()
    return config
