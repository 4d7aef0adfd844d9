"""`python -m scripts.launch` end to end, as a real subprocess: artifacts, resume on rerun, and configs that fail fast.

The subprocesses run on one CPU device (XLA_FLAGS stripped: conftest's 8 simulated devices are for in-process
sharding tests), so any batch size validates.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = [
    "--config=configs/lm/arith.py:size=tiny",
    "--config.train.steps=8",
    "--config.train.log_every=4",
    "--config.train.checkpoint_every=4",
    "--config.train.batch_size=16",
    "--config.train.seq_len=40",  # the longest K=2 example is 36 tokens
    "--config.task.num_steps=(1,2)",
    "--config.eval.problems_per_k=2",
    "--config.eval.decode_parity_problems=2",
    "--config.train.progress=False",
]


def _launch(workdir, *overrides, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "scripts.launch", f"--workdir={workdir}", *BASE, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_launch_writes_artifacts_and_a_rerun_resumes(tmp_path):
    workdir = tmp_path / "run"
    first = _launch(workdir, "--config.train.progress=True")
    _ok(first)
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 8 and config["train"]["seq_len"] == 40 and config["task"]["num_steps"] == [1, 2]
    records = _metrics(workdir)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [4, 8]
    assert all(r["train/loss"] > 0 and r["train/nonfinite_steps"] == 0 for r in train)
    # eval_every=0 (the default): the held-out loss is measured once, at the end.
    assert [r["step"] for r in records if "eval/loss" in r] == [8]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    acc = json.loads((workdir / "results" / "accuracy_by_k.json").read_text())
    assert acc["step"] == 8 and sorted(acc["accuracy_by_k"]) == ["1", "2"]
    for r in acc["accuracy_by_k"].values():
        assert r["n"] == 2 and 0 <= r["exact_match"] <= 1 and 0 <= r["step_accuracy"] <= 1
    parity = json.loads((workdir / "results" / "decode_parity.json").read_text())
    assert set(parity) == {"greedy", "sampled"}
    for mode in parity.values():
        assert mode["tokens_identical"] is True and mode["max_abs_logprob_diff"] <= 1e-5
    png = workdir / "figures" / "accuracy_by_k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    # The run ends by saying where its outputs are and how to view the curves; off a terminal, progress is short lines.
    err = first.stderr
    assert f"outputs in {workdir.resolve()}/" in err and "metrics.jsonl" in err and "checkpoints/" in err
    assert f"tensorboard --logdir {workdir.resolve()}" in err
    assert "train step 8/8 loss" in err and max(len(line) for line in err.splitlines()) < 400

    # The same command again resumes from checkpoint 8: nothing is retrained, the curve is untouched.
    mtime = (workdir / "checkpoints" / "8").stat().st_mtime_ns
    _ok(_launch(workdir))
    assert _metrics(workdir) == records
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    assert (workdir / "checkpoints" / "8").stat().st_mtime_ns == mtime
    assert json.loads((workdir / "results" / "accuracy_by_k.json").read_text())["step"] == 8


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.train.stepz=3", ["--config.train.stepz", "no key 'stepz'", 'Did you mean "steps"']),
        ("--config.train.steps=ten", ["--config.train.steps=ten"]),
        ("--config.train.seq_len=16", ["train.seq_len", "16 is shorter than the longest example"]),
        ("--config.model.n_heads=3", ["model.n_heads (3) must be divisible by model.n_kv_heads (2)"]),
        ("--config.eval.decode_parity_problems=-1", ["eval.decode_parity_problems", "must be >= 0"]),
    ],
    ids=["unknown_key", "wrong_type", "seq_len_too_short", "heads", "parity_problems"],
)
def test_bad_configs_fail_fast_naming_the_key(tmp_path, override, expected):
    workdir = tmp_path / "run"
    proc = _launch(workdir, override, timeout=120)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]
    # Rejected before anything ran: the loop writes workdir/config.json before it builds or compiles anything.
    assert not workdir.exists()
