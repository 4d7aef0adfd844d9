"""One policy of the test-time scaling study, trained alone with train_lm (e.g. for the regime map's policies).

COMMAND: .venv/bin/python -m scripts.launch --config=configs/scaling/policy.py:tiny,1500,20 --workdir=runs/tts_map/policy_m20
  (the argument is size,steps,modulus; lr 1e-2 for tiny, 3e-3 otherwise, as `common.policy_lm` and the judge use)
RUNTIME: a few CPU-minutes for the tiny size at 1500 steps.
EXPECT: train_lm's accuracy-by-K table for the policy.
"""

from configs.scaling import common


def get_config(arg: str | None = None):
    parts = (arg or "tiny,1500,10").split(",")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"configs/scaling/policy.py: argument {arg!r}; expected size,steps,modulus e.g. tiny,1500,20")
    size, steps, modulus = parts[0], int(parts[1]), int(parts[2])
    config = common.policy_lm(size, steps, 1e-2 if size == "tiny" else 3e-3, modulus)
    config.lock()
    return config
