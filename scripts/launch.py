"""Launch any experiment from a config file.

  python -m scripts.launch --config=configs/lm/arith.py:size=tiny --workdir=runs/arith_tiny \\
      --config.train.steps=200 --config.model.remat=full

The config is validated (unknown keys, wrong types, bad combinations) before anything is compiled; rerunning the
same command with the same --workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

import experiments

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; an existing one is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = _CONFIG.value
    experiment = experiments.get(config.experiment)
    experiment.validate(config)
    experiment.run(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
