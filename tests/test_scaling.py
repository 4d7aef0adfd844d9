"""Scaling-study analysis on hand-made cases, and the test-time compute reproduction end to end at tiny scale."""

import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from framework.search import analysis

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 1), (7, 3, 4), (4, 1, 4)]:
        subsets = list(itertools.combinations(range(n), k))
        brute = np.mean([any(i < c for i in s) for s in subsets])
        assert analysis.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError, match="pass_at_k"):
        analysis.pass_at_k(4, 5, 1)


def test_coverage_fit_recovers_a_known_curve():
    ks = [1, 2, 4, 8, 16, 32]
    cov = np.exp(-1.3 * np.asarray(ks, float) ** -0.6)
    fit = analysis.fit_coverage(ks, cov)
    assert fit["a"] == pytest.approx(-1.3, rel=1e-6) and fit["b"] == pytest.approx(-0.6, rel=1e-6)
    np.testing.assert_allclose(analysis.coverage_curve(fit, ks), cov, rtol=1e-6)
    assert math.isnan(analysis.fit_coverage([1, 2], [0.0, 1.0])["a"])  # no usable points


def test_difficulty_bins_and_compute_optimal():
    bins = analysis.difficulty_bins([0.9, 0.1, 0.5, 0.7, 0.3, 1.0, 0.0, 0.2, 0.6, 0.4], n_bins=5)
    assert bins.tolist() == [1, 5, 3, 2, 4, 1, 5, 4, 2, 3]  # 1 = easiest (highest pass@1), two per bin
    correct = {
        "a": np.array([1, 1, 0, 0], bool),
        "b": np.array([0, 0, 1, 1], bool),
    }
    chosen, right = analysis.compute_optimal(correct, np.array([1, 1, 2, 2]), np.array([True, False, True, False]))
    assert chosen == {1: "a", 2: "b"} and right.tolist() == [True, True, True, True]


def test_compute_optimal_at_equal_flops_only_picks_what_fits():
    correct = {
        "cheap@1": np.array([1, 0, 0, 0], bool),
        "dear@4": np.array([1, 1, 1, 1], bool),
        "mid@2": np.array([0, 1, 1, 0], bool),
    }
    flops = {"cheap@1": 1.0, "dear@4": 4.0, "mid@2": 2.0}
    bins, select = np.array([1, 1, 2, 2]), np.array([True, True, True, True])
    chosen, right = analysis.compute_optimal_at_flops(correct, flops, 2.0, bins, select)
    assert chosen == {1: "cheap@1", 2: "mid@2"} and right.tolist() == [True, False, True, False]  # dear@4 > budget
    chosen, _ = analysis.compute_optimal_at_flops(correct, flops, 4.0, bins, select)
    assert chosen == {1: "dear@4", 2: "dear@4"}
    with pytest.raises(ValueError, match="no configuration"):
        analysis.compute_optimal_at_flops(correct, flops, 0.5, bins, select)
    with pytest.raises(ValueError, match="no FLOPs"):
        analysis.compute_optimal_at_flops(correct, {"cheap@1": 1.0}, 2.0, bins, select)
    assert analysis.flops_to_match(0.5, {1.0: 0.25, 2.0: 0.5, 4.0: 0.75}) == 2.0
    assert analysis.flops_to_match(0.9, {1.0: 0.25}) == float("inf")


def test_subsample_pool_pass_at_n_bounds_every_selector():
    rng = np.random.default_rng(0)
    answers = [[int(x) for x in rng.integers(0, 3, 8)] for _ in range(20)]
    scores = [[rng.random(3) for _ in range(8)] for _ in range(20)]
    gold = [0] * 20
    out = analysis.subsample_pool(answers, scores, gold, 4, np.random.default_rng(1))
    for name in ("majority", "best_of_n", "weighted_best_of_n"):
        assert np.all(out[name] <= out["pass_at_n"])
    full = analysis.subsample_pool(answers, scores, gold, 8, np.random.default_rng(2))
    assert full["pass_at_n"].tolist() == [0 in a for a in answers]  # N = pool size: every sample is used


def test_reproduction_runs_at_tiny_scale(tmp_path):
    workdir = tmp_path / "ttc"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "scripts.reproduce.tts", f"--workdir={workdir}", "--scale=tiny"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("scaling", "coverage", "compute_optimal", "compute_optimal_flops", "label_sources", "run"):
        assert (workdir / "results" / f"{name}.json").exists()
    for name in (
        "accuracy_vs_n",
        "accuracy_vs_flops",
        "accuracy_by_difficulty_oracle",
        "compute_optimal",
        "coverage",
        "label_sources",
        "serial_vs_parallel",
    ):
        assert (workdir / "figures" / f"{name}.png").stat().st_size > 1000
    sc = json.loads((workdir / "results" / "scaling.json").read_text())
    assert set(sc["accuracy"]) == {
        "majority",
        "best_of_n",
        "weighted_best_of_n",
        "pass_at_n",
        "beam",
        "dvts",
        "lookahead",
        "revision_r1",
        "revision_r2",
    }
    assert set(sc["accuracy"]["beam"]) == {"2"} and set(sc["accuracy"]["majority"]) == {"1", "2", "4"}
    for name, d in sc["accuracy"].items():
        for n, acc in d.items():
            assert (
                0.0 <= acc <= sc["accuracy"]["pass_at_n"][n] + 1e-9
                or name in ("beam", "dvts", "lookahead")
                or name.startswith("revision")
            ), (name, n)
    flops = sc["flops_per_problem"]["weighted_best_of_n"]
    assert flops["1"] < flops["2"] < flops["4"]
    assert sc["flops_per_problem"]["lookahead"]["2"] > sc["flops_per_problem"]["beam"]["2"]  # rollouts cost
    fl = sc["flops_per_problem"]
    for n in ("1", "2", "4"):  # pool strategies: N samples at the pool's mean cost, PRM passes on top for (w)BoN
        assert fl["majority"][n] == pytest.approx(int(n) * fl["majority"]["1"])
        assert fl["weighted_best_of_n"][n] == pytest.approx(fl["best_of_n"][n])
        assert fl["weighted_best_of_n"][n] > fl["majority"][n] == pytest.approx(fl["pass_at_n"][n])
    assert 0 < sc["greedy"]["flops_per_problem"] and "lm.flops" in sc["flops_convention"]
    at_flops = json.loads((workdir / "results" / "compute_optimal_flops.json").read_text())
    for kind in ("oracle", "prm"):
        for n, row in at_flops[kind].items():
            assert row["flops"] == pytest.approx(flops[n])
            for choice in row["chosen"].values():  # every chosen configuration fits the budget
                name, at = choice.split("@")
                assert sc["flops_per_problem"][name][at] <= flops[n] * (1 + 1e-9)
    table = json.loads((workdir / "results" / "label_sources.json").read_text())
    assert set(table) == {"gold", "mc:2", "consensus:2", "orm", "oracle"}
    assert all(set(t["bon"]) == {"last", "min", "product"} for t in table.values())
    # The oracle PRM ranks perfectly: its top-scored sample is on the gold path whenever the pool holds one.
    assert table["oracle"]["step_auroc"] in (1.0, None) or math.isnan(table["oracle"]["step_auroc"])
    assert table["oracle"]["selection_accuracy"] == 1.0 or math.isnan(table["oracle"]["selection_accuracy"])
    gold_ceiling, answer_ceiling = sc["ceilings"]["gold_pass_at_n"], sc["ceilings"]["pass_at_n"]
    for n in ("1", "2", "4"):
        assert 0.0 <= gold_ceiling[n] <= answer_ceiling[n] == sc["accuracy"]["pass_at_n"][n]
        for name in ("best_of_n", "weighted_best_of_n"):  # a chosen gold-path trace needs a gold-path sample
            assert sc["on_gold_path"][name][n] <= gold_ceiling[n] + 1e-9
            assert sc["gap_to_gold_ceiling"][name][n] == pytest.approx(gold_ceiling[n] - sc["accuracy"][name][n])
        assert sc["stderr"]["majority"][n] >= 0
    assert "weighted best-of-N" in (workdir / "results" / "summary.txt").read_text()


@pytest.mark.parametrize("key", ["search_max_n", "lookahead_max_n", "revision_max_n"])
def test_search_caps_are_validated_by_name(key):
    from configs.scaling import tiny
    from experiments import tts

    config = tiny.get_config()
    config.eval[key] = 0
    with pytest.raises(ValueError, match=rf"eval\.{key}.*must be >= 1, got 0"):
        tts.validate(config)


def test_compute_optimal_keeps_fractional_correctness():
    """Correctness averaged over seeds (0, 0.5, 1) comes back unrounded: the chosen configuration's accuracy is the
    same mean the reference curves report (a bool result once counted every half-right problem as right)."""
    correct = {"a": np.array([0.5, 0.0, 1.0, 0.5]), "b": np.array([0.0, 0.5, 0.5, 0.0])}
    bins, select = np.array([1, 1, 2, 2]), np.array([True, True, True, True])
    chosen, right = analysis.compute_optimal(correct, bins, select)
    assert chosen == {1: "a", 2: "a"} and right.tolist() == [0.5, 0.0, 1.0, 0.5]
    _, right = analysis.compute_optimal_at_flops(correct, {"a": 1.0, "b": 1.0}, 1.0, bins, select)
    assert right.mean() == correct["a"].mean()


HF_POLICY = str(ROOT / "tests" / "assets" / "hf" / "llama_nopad")


def _hf_config():
    from configs.scaling import tiny

    config = tiny.get_config()
    config.model.hf_path = HF_POLICY  # the policy's model section (config.model is config.policy.train_lm.model)
    config.judge.use_policy = False
    config.judge.train_lm.train.update(steps=20, checkpoint_every=20, log_every=10)
    config.revision.enabled = False
    return config


def test_imported_hf_policy_config_is_validated():
    """An imported policy checkpoint is accepted with an own judge and revision off; what cannot be supported honestly
    (the policy as its own judge: the PRMs need an arithmetic-tokenizer LM; revision: retry training on Lumen's
    tokenizer) is a ConfigError naming the field, as are a folder without a checkpoint and two policies at once."""
    from experiments import tts
    from framework import config as config_lib

    tts.validate(_hf_config())
    for field, value, match in [
        ("judge.use_policy", True, r"judge\.use_policy.*cannot be the judge"),
        ("revision.enabled", True, r"revision\.enabled.*revision\.enabled=False"),
        ("policy.workdir", "runs/some_policy", r"policy\.workdir.*both name the policy"),
        ("model.hf_path", str(ROOT / "tests"), r"model\.hf_path.*config\.json"),
    ]:
        config = _hf_config()
        section, key = field.split(".")
        config[section][key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            tts.validate(config)


@pytest.mark.slow
def test_tts_runs_with_an_imported_hf_policy(tmp_path):
    """The whole study at tiny scale with a random imported Llama as the policy: every stage runs, the policy is
    priced with `lm.flops` of the imported config (greedy: prefill of its own prompt tokens plus the new tokens)."""
    from experiments import tts
    from framework.models import hf, lm

    config = _hf_config()
    results = tts.run(config, str(tmp_path / "tts_hf"))
    sc = results["scaling"]
    hf_cfg = hf.hf_model_config(config.model)
    assert sc["params"]["policy"] == lm.param_count(hf_cfg) != sc["params"]["verifier"]
    assert sc["greedy"]["flops_per_problem"] >= lm.flops(hf_cfg, 1, 1) > 0
    fl = sc["flops_per_problem"]
    assert fl["majority"][2] == pytest.approx(2 * fl["majority"][1])  # in memory the budgets are ints
    assert 0.0 <= sc["accuracy"]["weighted_best_of_n"][4] <= sc["accuracy"]["pass_at_n"][4]
    assert "oracle" in results["label_sources"] and not any(k.startswith("revision") for k in sc["accuracy"])


def test_prm_vs_bigger_model_accounting():
    """Training and inference FLOPs counted apart and together: the break-even number of problems is where policy +
    PRM training plus Q searches equals the bigger model's training plus Q greedy answers."""
    from framework.search import report

    sc = {
        "training_flops": {"policy": 10.0, "prm_fit": 4.0, "prm_traces": 1.0, "judge": 100.0},
        "bigger_model_greedy": {"accuracy": 0.9, "flops_per_problem": 8.0},
        "flops_per_problem": {"weighted_best_of_n": {1: 2.0, 2: 4.0, 4: 8.0, 8: 16.0}, "beam": {4: 20.0}},
        "accuracy": {"weighted_best_of_n": {1: 0.3, 2: 0.4, 4: 0.5, 8: 0.6}, "beam": {4: 0.7}},
    }
    text = "\n".join(report.prm_vs_bigger_lines(sc))
    assert "= 15; bigger model 100" in text  # 10 + 4 + 1
    assert "weighted best-of-N at N=4: 0.500 at 8 per problem" in text  # the largest N within the bigger model's cost
    assert "beam search: every N costs more" in text
    sc["flops_per_problem"]["weighted_best_of_n"][4] = 7.0  # 1 FLOP cheaper per problem, 85 cheaper to train
    assert "cheaper in both" in "\n".join(report.prm_vs_bigger_lines(sc))
    sc["training_flops"]["judge"] = 5.0  # now 10 dearer to train, 1 cheaper per problem: equal after 10 problems
    assert "totals equal after 10 problems" in "\n".join(report.prm_vs_bigger_lines(sc))
