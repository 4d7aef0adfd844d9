"""The VLM pipeline end to end at test scale: a few steps per stage, a few eval problems (checks wiring, not skill).

COMMAND: python -m scripts.launch --config=configs/vlm/tiny.py --workdir=runs/vlm_tiny
RUNTIME: under a minute on a 2-core CPU (mostly compiles).  EXPECT: artifacts written; accuracies near 0 (so the
pretraining's stopping rule runs to its cap, 3 steps).
"""

from configs.vlm import common


def get_config(arg: str | None = None):
    config = common.vlm_experiment()
    for name in ("pretrain", "stage1", "stage2"):
        config[name].steps = 2
    config.pretrain.update(until_exact=0.9, check_every=1, max_steps=3)  # the stopping rule: checks at steps 2, 3
    config.task.num_steps = (1, 2)
    config.train.update(batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1, progress=False)
    config.eval.update(problems_per_k=2, batch_size=2)
    config.lock()
    return config
