"""Test-time scaling on the quickstart's task: accuracy vs N for majority, best-of-N, weighted BoN, beam and DVTS
with a PRM, by difficulty, in FLOPs, compute-optimal vs best-of-N, coverage, and the PRM label-source table.

COMMAND: python -m scripts.launch --config=configs/scaling/default.py --workdir=runs/tts_default \
           --config.policy.workdir=runs/tts/policy --config.judge.workdir=runs/tts/judge
         (or scripts/reproduce/test_time_compute.py, which trains the two policies first when they are missing)
RUNTIME: measured 36 min on a 2-core CPU shared with three other jobs, both policies already trained (training them
  adds ~7 min for the policy and ~20 min for the judge on that machine).
EXPECT (measured, README "Test-time compute"): greedy 0.30; weighted BoN ~0.38 and majority ~0.35 at N = 64,
  naive BoN, beam and DVTS falling at large N; pass@N 0.98; gold/consensus PRMs F1 ~0.49, AUROC ~0.93-0.95.
"""

from configs.scaling import common


def get_config(arg: str | None = None):
    del arg
    config = common.scaling_experiment()
    config.lock()
    return config
