"""Test-time scaling on the quickstart's task: accuracy vs N (to 256) for majority, best-of-N, weighted BoN, beam,
DVTS and lookahead search with a PRM, revision at serial:parallel ratios, by difficulty, in FLOPs, compute-optimal vs
best-of-N at equal FLOPs, coverage, and the PRM label-source table.

COMMAND: .venv/bin/python -m scripts.reproduce.tts --workdir=runs/ttc   (trains the policy and the judge first)
         or .venv/bin/python -m scripts.launch --config=configs/scaling/default.py --workdir=runs/tts \
           --config.policy.workdir=<train_lm workdir> --config.judge.workdir=<train_lm workdir>
RUNTIME: ~28-30 min on a 2-core CPU from a fresh workdir (policy ~1-2.5 min, judge ~2-3.5, verifiers ~5-6, pool ~1,
  search ~9-10.5, revision ~5-8.5; docs/results/tts.md has the measured runs and their machines). A
  rerun reuses the trained policies and the fitted verifiers.
EXPECT (docs/results/tts.md; ~0.05 standard error per accuracy, and the policy's greedy accuracy
  depends on the machine and JAX build it trains on: 0.35 and 0.45 measured): majority vote and weighted BoN within
  ~0.06 of a single sample at every N up to 256 (0.35-0.44 in the measured runs); naive BoN no better; beam / DVTS /
  lookahead 0.30-0.39, not above weighted BoN at equal N; serial revision below parallel chains at every N; pass@256
  1.00; gold and consensus PRMs F1 ~0.6-0.85 (AUROC ~0.94-0.96), MC PRMs F1 <= 0.4; compute-optimal at equal FLOPs
  within ~0.1 of weighted BoN; bigger model greedy 1.00.
"""

from configs.scaling import common


def get_config(arg: str | None = None):
    del arg
    config = common.scaling_experiment()
    config.lock()
    return config
