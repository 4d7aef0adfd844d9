"""Test-time scaling on the quickstart's task: accuracy vs N (to 256) for majority, best-of-N, weighted BoN, beam,
DVTS and lookahead search with a PRM, revision at serial:parallel ratios, by difficulty, in FLOPs, compute-optimal vs
best-of-N at equal FLOPs, coverage, and the PRM label-source table.

COMMAND: python -m scripts.launch --config=configs/scaling/default.py --workdir=runs/tts/v2 \
           --config.policy.workdir=runs/tts/policy --config.judge.workdir=runs/tts/judge
         (or scripts/reproduce/test_time_compute.py, which trains the two policies first when they are missing)
RUNTIME: measured 19.2 min wall (1601 CPU-seconds) on the 2-core CPU at load average 1.7-4.4, both policies
  already trained; 53 min at load 7-11. Training the policies adds ~7 min
  (policy) and ~20 min (judge) on a loaded machine. A rerun reuses the fitted verifiers in <workdir>/verifiers/.
EXPECT (measured, README "Test-time compute"): greedy 0.30; majority 0.355 and weighted BoN 0.35 at N = 256, naive
  BoN falling to 0.18; beam / DVTS / lookahead 0.29-0.32 at N = 4-8, falling at N = 32-64; pass@256 1.00; gold and
  consensus PRMs F1 ~0.53, AUROC ~0.93-0.95; compute-optimal 0.36-0.43 vs weighted BoN 0.28-0.33 at equal FLOPs.
"""

from configs.scaling import common


def get_config(arg: str | None = None):
    del arg
    config = common.scaling_experiment()
    config.lock()
    return config
