"""`python -m scripts.launch` with a preference config, end to end as a subprocess: SFT, DPO, results; a bad config
fails fast naming the key."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config=configs/preference/dpo.py:kind=sigmoid",
    "--config.sft.steps=4",
    "--config.sft.stop_when=",
    "--config.sft.seq_len=40",
    "--config.sft.batch_size=8",
    "--config.sft.log_every=2",
    "--config.task.num_steps=(1,2)",
    "--config.pairs.n=16",
    "--config.pairs.eval_n=8",
    "--config.train.steps=3",
    "--config.train.batch_size=8",
    "--config.train.seq_len=48",
    "--config.train.log_every=1",
    "--config.train.progress=False",
    "--config.sft.progress=False",
    "--config.eval.problems_per_k=2",
    "--config.pref.precompute_ref_logps=True",
]


def _launch(workdir, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "scripts.launch", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_launch_sft_then_dpo(tmp_path):
    proc = _launch(tmp_path / "run", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "results" / "preference.json").read_text())
    assert results["step"] == 3 and results["kind"] == ["sigmoid"] and results["data"]["problems"] == 16
    # on-policy pairs (the study config's source): every problem the SFT policy gets wrong in a sample gives one; a
    # pair with an empty sampled completion (or chosen == rejected) is dropped and counted
    d = results["data"]
    assert 0 < d["pairs"] and d["pairs"] + d["dropped_empty"] + d["dropped_identical"] == 16 - d["all_right"]
    assert set(results["policy"]["accuracy_by_k"]) == {"1", "2"}
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "train/rewards/accuracies" in records[0] and (tmp_path / "run" / "sft" / "metrics.jsonl").exists()


@pytest.mark.slow  # tests/test_preference.py checks the same validation in process
def test_launch_rejects_a_bad_beta(tmp_path):
    proc = _launch(tmp_path / "bad", *TINY, "--config.pref.beta=-1.0", timeout=120)
    assert proc.returncode == 1 and "beta" in proc.stderr and "FATAL invalid config" in proc.stderr
