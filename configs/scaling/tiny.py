"""The test-time scaling pipeline at CI scale: every stage runs, nothing is meant to be accurate.

COMMAND: python -m scripts.launch --config=configs/scaling/tiny.py --workdir=runs/tts_tiny
RUNTIME: measured 55 s as tests/test_scaling.py's reproduction test (script in a subprocess) on the 2-core CPU at
  load average 0.8-3; 131 s at load ~8 (most of it compiling). EXPECT: every figure and JSON written; a 20-step
  policy is mostly wrong, so the accuracies are near 0 and the curves are flat.
"""

from configs.scaling import common


def get_config(arg: str | None = None):
    del arg
    config = common.scaling_experiment()
    config.policy.train_lm.train.update(steps=20, checkpoint_every=20, log_every=10)
    config.judge.use_policy = True
    config.sampling.batch_size = 64
    config.prm.update(
        train_problems=16, samples_per_problem=2, num_steps=(2, 3), heldout_problems=8, steps=4, batch_size=16
    )
    config.labels.update(sources=("gold", "mc:2", "consensus:2", "orm"), bon_n=4, pool=4)
    config.revision.update(steps=4, ratios=(1, 2), lines_per_sample=2)
    config.eval.update(
        problems=8,
        num_steps=(2, 3),
        budgets=(1, 2, 4),
        search_max_n=2,
        lookahead_max_n=2,
        revision_max_n=2,
        seeds=(0,),
        m=2,
    )
    config.lock()
    return config
