"""Multi-host in miniature: 2 JAX processes x 4 CPU devices on localhost (jax.distributed + gloo), started by
`scripts.launch_local`, train to the same losses as one process with 8 devices; each process loads only its rows of
every global batch, and only process 0 writes metrics and logs."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = [
    "--config=configs/lm/arith.py:size=tiny",
    "--config.train.steps=4",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=2",
    "--config.train.batch_size=8",
    "--config.train.seq_len=40",
    "--config.task.num_steps=(1,2)",
    "--config.train.warmup_steps=1",
    "--config.eval.problems_per_k=1",
    "--config.eval.decode_parity_problems=0",  # decode parity has its own tests; here it would only add compiles
    "--config.train.progress=False",
]


def _env(devices: int | None = None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# FSDP over all 8 devices: parameters and optimizer state are split across both processes, as is every batch.
MESH = ("--config.mesh.data=1", "--config.mesh.fsdp=-1")


def test_two_processes_train_like_one(tmp_path):
    mesh = MESH
    multi, single = tmp_path / "multi", tmp_path / "single"
    launcher = [sys.executable, "-m", "scripts.launch_local", "--num_processes=2", "--devices_per_process=4", "--"]
    both = subprocess.Popen(
        [*launcher, f"--workdir={multi}", *ARGS, *mesh],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    one = subprocess.Popen(
        [sys.executable, "-m", "scripts.launch", f"--workdir={single}", *ARGS, *mesh],
        cwd=ROOT,
        env=_env(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:  # the timeouts only guard against a hang (a loaded 2-core machine can take minutes)
        out_multi, _ = both.communicate(timeout=900)
        out_single, _ = one.communicate(timeout=900)
    finally:
        for p in (both, one):
            if p.poll() is None:
                p.kill()
    assert both.returncode == 0, out_multi[-6000:]
    assert one.returncode == 0, out_single[-6000:]
    # Both processes joined one 8-device runtime and each loaded its own half of every batch.
    assert re.search(r"\[p0\] .*process 0/2 loads rows \[0, 4\) of each global batch of 8", out_multi), out_multi
    assert re.search(r"\[p1\] .*process 1/2 loads rows \[4, 8\) of each global batch of 8", out_multi), out_multi
    # Process 0 alone wrote metrics (one record per step, none twice), tensorboard and the results table.
    got, want = _records(multi), _records(single)
    assert [r["step"] for r in got if "train/loss" in r] == [1, 2, 3, 4]
    assert len(list((multi / "tensorboard").iterdir())) == 1
    assert "[p0]    1 |" in out_multi and "[p1]    1 |" not in out_multi
    np.testing.assert_allclose(
        [r["train/loss"] for r in got if "train/loss" in r],
        [r["train/loss"] for r in want if "train/loss" in r],
        rtol=1e-5,
    )
    np.testing.assert_allclose(got[-1]["eval/loss"], want[-1]["eval/loss"], rtol=1e-5)
    assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
