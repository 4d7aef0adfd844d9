"""The default experiment: a small arithmetic LM, trained on CPU and scored by number of steps K.

COMMAND: .venv/bin/python -m scripts.launch --config=configs/quickstart.py --workdir=runs/quickstart   (or `make quickstart`)
RUNTIME: ~1-3 min on a 2-core CPU (at most 2000 steps of the 100k-parameter `tiny` model, then evaluation).
EXPECT: a deliberately partly trained policy whose exact match falls with K: ~0.9-1.0 at K=1, ~0.5-0.85 at K=4-5,
~0.1-0.6 at K=8; per-step accuracy ~0.75-1.0 (ranges over seeds and CPUs: docs/results/quickstart.md).

The task is the modular-arithmetic chain with modulus 10 (one-digit numbers, `Q 3+4*7-1`), all three ops and
K = 1..8: the format, checker and difficulty knobs of the full task, at a size a 2-core CPU learns in minutes. The
mod-100 task (`configs/lm/arith.py`) needs a longer run.

Training stops when the held-out token accuracy reaches 0.98 (`train.stop_when`, checked every 25 steps) or after
2000 steps. A fixed step count does not give a stable partly trained policy here: when the tiny model learns where
each step's operand sits in the prompt varies from a few hundred to thousands of steps with the seed (and with the
CPU's rounding), so the same 1500-step run gave a policy that solved every K on one seed, none beyond K=1 on another,
and different tables on two CPUs. Stopping at a measured quality gives the same kind of policy on the seeds that reach
it. The default seed is 1: seeds 1-5 all stop early (725-1075 steps), while seed 0 runs into the cap (held-out token
accuracy 0.96-0.97) and its table then depends on the thread count (docs/results/quickstart.md).
"""

from configs import common


def get_config(arg: str | None = None):
    del arg
    # The shared mod-10 recipe (configs/common.mod10_lm), trained until the held-out token accuracy reaches 0.98
    # (checked every 25 steps), at most 2000 steps: the policy's quality, not a step count, is what must not depend on
    # the seed or the CPU (see the module docstring). Seed 0 hits the step cap.
    config = common.mod10_lm(seed=1, steps=2000, eval_every=25, stop_when="token_accuracy>=0.98")
    config.eval.problems_per_k = 128
    config.lock()
    return config
