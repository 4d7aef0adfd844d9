"""The default experiment: a small arithmetic LM, trained on CPU and scored by number of steps K.

COMMAND: python -m scripts.launch --config=configs/quickstart.py --workdir=runs/quickstart   (or `make quickstart`)
RUNTIME: ~2.5 min on a 2-core CPU (1500 steps of the 100k-parameter `tiny` model, then evaluation).
EXPECT: greedy exact match 1.0 at K=1-2, falling through ~0.6 at K=4 to ~0 at K=7-8; per-step accuracy 1.0 at
K=1-2, ~0.8 mid-range (measured numbers, and how they move with the step count, in README.md).

The task is the modular-arithmetic chain with modulus 10 (one-digit numbers, `Q 3+4*7-1`), all three ops and
K = 1..8: the format, checker and difficulty knobs of the full task, at a size a 2-core CPU learns in minutes. The
mod-100 task (`configs/lm/arith.py`) needs a longer run.
"""

from configs import common


def get_config(arg: str | None = None):
    del arg
    config = common.lm_experiment(size="tiny")
    config.task.modulus = 10
    config.train.update(steps=1500, batch_size=32, seq_len=80, lr=1e-2, checkpoint_every=500, log_every=100)
    config.eval.problems_per_k = 64
    config.lock()
    return config
