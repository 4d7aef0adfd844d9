"""Test-time scaling on the quickstart's task: accuracy vs N (to 256) for majority, best-of-N, weighted BoN, beam,
DVTS and lookahead search with a PRM, revision at serial:parallel ratios, by difficulty, in FLOPs, compute-optimal vs
best-of-N at equal FLOPs, coverage, and the PRM label-source table.

COMMAND: python -m scripts.reproduce.test_time_compute --workdir=runs/ttc   (trains the policy and the judge first)
         or python -m scripts.launch --config=configs/scaling/default.py --workdir=runs/tts \
           --config.policy.workdir=<train_lm workdir> --config.judge.workdir=<train_lm workdir>
RUNTIME: measured 27:37 wall on a quiet 2-core AMD EPYC from a fresh workdir (policy 2.5 min, judge 3.4, verifiers
  6.1, pool 1.3, search 8.9, revision 5.2). A rerun reuses the trained policies and the fitted verifiers.
EXPECT (measured, docs/results/test_time_compute.md): greedy 0.35;
  weighted BoN 0.365 -> 0.42 and majority 0.365 -> 0.395
  at N = 256, naive BoN 0.35-0.405; beam / DVTS 0.32-0.375, lookahead 0.33-0.34; pass@256 1.00; gold and consensus
  PRMs F1 0.83 / 0.82, AUROC 0.96; compute-optimal at equal FLOPs within -0.06..+0.05 of weighted BoN; bigger
  model 1.00.
"""

from configs.scaling import common


def get_config(arg: str | None = None):
    del arg
    config = common.scaling_experiment()
    config.lock()
    return config
