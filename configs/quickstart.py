"""The default experiment: a small arithmetic LM, trained on CPU and scored by number of steps K.

COMMAND: python -m scripts.launch --config=configs/quickstart.py --workdir=runs/quickstart   (or `make quickstart`)
RUNTIME: ~4 min on a 2-core CPU (3000 steps of the 100k-parameter `tiny` model, then evaluation).
EXPECT: per-step accuracy ~0.9; greedy exact match ~1.0 at K=1-2, ~0.7 at K=4-5, ~0.5 at K=6, near 0 at K=8
(measured numbers in README.md).

The task is the modular-arithmetic chain with modulus 10 (one-digit numbers, `Q 3+4*7-1`), all three ops and
K = 1..8: the format, checker and difficulty knobs of the full task, at a size a 2-core CPU learns in minutes. The
mod-100 task (`configs/lm/arith.py`) needs a longer run.
"""

from configs import common


def get_config(arg: str | None = None):
    del arg
    config = common.lm_experiment(size="tiny")
    config.task.modulus = 10
    config.train.update(steps=3000, batch_size=32, seq_len=80, lr=1e-2, checkpoint_every=1000, log_every=100)
    config.eval.problems_per_k = 64
    config.lock()
    return config
