"""Test-time scaling on the quickstart's task: accuracy vs N for majority, best-of-N, weighted BoN, beam and DVTS
with a PRM, by difficulty, in FLOPs, compute-optimal vs best-of-N, coverage, and the PRM label-source table.

COMMAND: python -m scripts.launch --config=configs/scaling/default.py --workdir=runs/tts_default \
           --config.policy.workdir=runs/tts/policy --config.judge.workdir=runs/tts/judge
         (or scripts/reproduce/test_time_compute.py, which trains the two policies first when they are missing)
RUNTIME: measured 36 min on a 2-core CPU shared with three other jobs, both policies already trained (training them
  adds ~7 min for the policy and ~20 min for the judge on that machine).
EXPECT: see README "Test-time compute": weighted BoN and beam search above majority at mid budgets, all far below
  pass@N, search helping most on the middle difficulty bins.
"""

from configs.scaling import common


def get_config(arg: str | None = None):
    del arg
    config = common.scaling_experiment()
    config.lock()
    return config
