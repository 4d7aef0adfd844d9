"""Multi-agent topologies of one role-trained tiny LM on mod-10 chains: the agents study (one seed per run).

COMMAND: .venv/bin/python -m scripts.launch --config=configs/agents/study.py:seed=0 --workdir=runs/agents/seed0
  (scripts/reproduce/agents.py runs seeds 0 and 1 and writes docs/results/agents.md's figure and JSON).
RUNTIME: ~25-50 min per seed on a busy shared 2-core CPU (role training to the last budget, 1600-2000 steps, then
  19 topology runs per budget); a rerun replays finished runs from their logs in under a minute.
EXPECT: the single agent's accuracy rises with the budget (seeds 0 / 1: 0.15 / 0.24 / 0.57 and 0.16 / 0.34 / 0.43);
  vote stays within ~0.05 of it and debate within ~0.1 (mostly below); centralised and hybrid fall below it (the
  orchestrator's split is rarely right); the two-stage pipeline is at or above it; the MCP calculator lifts the
  single agent (+0.02 to +0.22); a planted wrong step reaches the answer less often under vote and debate than for
  the single agent (docs/results/agents.md).
"""

from configs import common
from configs.agents.common import agents_experiment


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, seed=0, problems=128)
    config = agents_experiment()
    config.seed = args.seed
    config.study.problems = args.problems
    config.lock()
    return config
