"""The LoRA study (scripts/reproduce/lora.py) end to end on a tiny setting: every run trains on the one loop in its
own directory, and rerunning the study restores the finished runs instead of training them again."""

import json
import subprocess
import sys

import numpy as np
import pytest


def _one(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.slow
def test_lora_study_runs_on_the_loop_and_resumes(tmp_path):
    argv = [sys.executable, "-m", "scripts.reproduce.lora", f"--workdir={tmp_path}", "--base_steps=4", "--steps=6"]
    argv += ["--lrs=1e-2", "--lr_extend=0", "--seeds=0", "--methods=full,lora+", "--ranks=1", "--problems_per_k=2"]
    argv += ["--eval_batches=1", "--base_k=1,2", "--new_k=1,2", "--nobase_eval"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(tmp_path / "results" / "lora.json") as f:
        out = json.load(f)
    assert [(r["method"], r["rank"]) for r in out["rows"]] == [("full", None), ("lora+", 1)]
    runs = {  # <method>[_r<rank>]_lr<lr>_s<seed>_<steps>steps_<fingerprint>; full: --lrs x --full_lr_scale (1/3)
        "full": _one(tmp_path.glob("runs/full_lr0.00333333_s0_6steps_*")),
        "lora+": _one(tmp_path.glob("runs/lora+_r1_lr0.01_s0_6steps_*")),
    }
    for method, run in runs.items():
        with open(run / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6], method  # every step's loss
        row = next(r for r in out["rows"] if r["method"] == method)
        seed0 = row["sweep"][0]["seeds"][0]
        assert seed0["train_loss"] == pytest.approx(np.mean([r["train/loss"] for r in records]))
        assert np.isfinite(row["eval_loss"]) and row["trainable_params"] > 0
    assert out["rows"][1]["trainable_params"] < 0.2 * out["rows"][0]["trainable_params"]
    # Rerun: both runs restore their final checkpoints (no new metric records) and give the same results.
    second = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    with open(tmp_path / "results" / "lora.json") as f:
        again = json.load(f)
    assert [r["eval_loss"] for r in again["rows"]] == [r["eval_loss"] for r in out["rows"]]
    assert [r["exact_match_mean"] for r in again["rows"]] == [r["exact_match_mean"] for r in out["rows"]]
    for run in runs.values():
        with open(run / "metrics.jsonl") as f:
            assert len(f.readlines()) == 6
