"""Test-time compute on the arithmetic task: accuracy vs N (greedy, majority, BoN, weighted BoN, beam, DVTS, lookahead,
revision at serial:parallel ratios, pass@N), the same per difficulty bin, FLOPs, compute-optimal vs best-of-N per N
and at equal FLOPs, coverage with a fitted curve, the PRM label-source table (gold vs Monte-Carlo with N_MC in
{1, 4, 16} vs consensus vs ORM: F1, AUROC, BoN accuracy) and the aggregation ablation (last / min / product).

  python -m scripts.reproduce.tts --workdir=runs/test_time_compute            # default scale
  python -m scripts.reproduce.tts --workdir=/tmp/ttc --scale=tiny              # CI scale (~1 min)
  python -m scripts.reproduce.tts --workdir=runs/ttc \\
      --policy_workdir=runs/tts/policy --judge_workdir=runs/tts/judge                       # reuse trained policies

The policy (the tiny LM on the quickstart's task, `configs/scaling/common.py`) and the judge (the small size, same
task) are trained into <workdir>/policy and <workdir>/judge unless given; rerunning resumes them and reuses the
fitted verifiers. Default scale from a fresh workdir: about half an hour on a 2-core CPU (policies trained here);
docs/results/test_time_compute.md has the measured run. FLOPs per problem are `lm.flops` of every policy call
(prefill + decode) and verifier pass (`SearchResults.flops` with each model's config).
Writes <workdir>/results/*.json, <workdir>/figures/*.png and <workdir>/results/summary.txt (the tables quoted in
docs/results/test_time_compute.md).
"""

from __future__ import annotations

import os

from absl import app, flags

from configs.scaling import default, tiny
from experiments import tts
from framework.search import report

_WORKDIR = flags.DEFINE_string("workdir", "runs/test_time_compute", "Output directory.")
_SCALE = flags.DEFINE_enum("scale", "default", ["default", "tiny"], "default (by hand) or tiny (CI).")
_POLICY = flags.DEFINE_string("policy_workdir", None, "A finished train_lm workdir to use as the policy.")
_JUDGE = flags.DEFINE_string("judge_workdir", None, "A finished train_lm workdir to use as the judge.")
_PROBLEMS = flags.DEFINE_integer("problems", None, "Override eval.problems.")


def main(argv):
    del argv
    config = (tiny if _SCALE.value == "tiny" else default).get_config()
    with config.unlocked():
        config.policy.workdir = _POLICY.value
        config.judge.workdir = _JUDGE.value
        if _PROBLEMS.value:
            config.eval.problems = _PROBLEMS.value
    results = tts.run(config, _WORKDIR.value)
    with open(os.path.join(_WORKDIR.value, "results", "summary.txt"), "w") as f:
        f.write(report.summary(results) + "\n")
    print(f"wrote {_WORKDIR.value}/results and {_WORKDIR.value}/figures in {results['seconds']:.0f} s")


if __name__ == "__main__":
    app.run(main)
