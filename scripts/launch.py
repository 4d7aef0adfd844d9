"""Launch any experiment from a config file.

  python -m scripts.launch --config=configs/lm/arith.py:size=tiny --workdir=runs/arith_tiny \\
      --config.train.steps=200 --config.model.remat=full

The config is validated (unknown keys, wrong types, bad combinations) before anything is compiled; rerunning the
same command with the same --workdir resumes from the latest checkpoint. SIGTERM (pre-emption) checkpoints the
current step and exits 0.

Several processes (multi-host): run the same command on every host with --distributed (TPU pod slices and SLURM
GPU clusters are detected by jax.distributed), or name the coordinator explicitly:
  --coordinator_address=host0:1234 --num_processes=2 --process_id=0   (scripts/launch_local.py does this locally)
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

import experiments

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; an existing one is resumed.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU pods, SLURM and Open MPI)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On a config error, show the whole traceback, not one line.")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
    """Joins the multi-controller runtime if asked to (flags above); CPU processes talk through gloo."""
    if not (_DISTRIBUTED.value or _COORDINATOR.value):
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
    logging.warning(
        "process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count()
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of a key the config lacks reported in one line instead of a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # how ml_collections reports `--config.a.b=v` for a missing key
        chain = [e]
        while isinstance(chain[-1].__context__, (AttributeError, KeyError)):
            chain.append(chain[-1].__context__)
        missing = str(chain[-1].args[0]) if chain[-1].args else "?"  # the innermost KeyError holds the bare name
        hint = next(
            (ln for c in reversed(chain) for ln in str(c.args[0] if c.args else "").splitlines() if "Did you" in ln), ""
        )
        overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        bad = [o for o in overrides if missing in o.split(".")[1:]]
        if not bad:  # not an override's key (e.g. a bug inside the config file): keep the traceback
            raise
        print(f"FATAL config override {', '.join('--' + o for o in bad)}: no key {missing!r}. {hint}", file=sys.stderr)
        sys.exit(1)


def summary(workdir: str) -> list[str]:
    """Where a finished run put its outputs, and the commands to look at them: a few lines for the terminal."""
    root = os.path.abspath(workdir)
    lines = [f"outputs in {root}/"]
    described = (
        ("config.json", "the config as run"),
        ("metrics.jsonl", "train/ and eval/ metrics, one JSON record per logged step"),
        ("checkpoints", "orbax checkpoints (rerun the same command to resume)"),
        ("results", "result tables (JSON)"),
        ("figures", "figures (PNG)"),
    )
    for name, what in described:
        path = os.path.join(root, name)
        if os.path.exists(path):
            count = f" ({len(os.listdir(path))} entries)" if os.path.isdir(path) else ""
            lines.append(f"  {name + ('/' if os.path.isdir(path) else ''):<15} {what}{count}")
    if any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(root) for f in fs):
        lines.append(f"view the curves: tensorboard --logdir {root}   (pip install tensorboard, or the 'viz' extra)")
    return lines


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU backend" lines are not news
    config = _CONFIG.value
    init_distributed()
    from framework.config import ConfigError
    from framework.training.loop import Preempted

    try:
        experiment = experiments.get(config.experiment)
        experiment.validate(config)
    except (ConfigError, ValueError) as e:  # a bad config: one line (the traceback with --verbose)
        if _VERBOSE.value:
            raise
        print(f"FATAL invalid config: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        experiment.run(config, _WORKDIR.value)
    except Preempted as e:
        print(str(e), file=sys.stderr)  # exit status 0: the work is saved, the scheduler may restart the job
        return
    import jax

    if jax.process_index() == 0:
        print("\n".join(summary(_WORKDIR.value)), file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
