"""The preference trainer on the one loop: first-step values, precomputed == on-the-fly reference (bitwise),
reference-free kinds never touch the reference, LoRA with the base as reference, and config errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs.preference.common import preference_experiment
from experiments import preference
from framework import config as config_lib
from framework import peft, prefopt, sharding
from framework.models import lm
from framework.training import loop

SEQ = 48  # the longest K<=2 pair is 36 tokens


@pytest.fixture(scope="module")
def setup():
    config = preference_experiment(size="tiny")
    config.model.update(max_seq_len=64, n_layers=1)  # one block: the trainer's plumbing, at half the compile time
    config.task.num_steps = (1, 2)
    config.pairs.n = 16  # two batches: steps 1 and 3 see the same one
    config.train.update(steps=3, batch_size=8, seq_len=SEQ, log_every=1, checkpoint_every=100, progress=False)
    config.train.update(lr=1e-2, warmup_steps=0)
    config.train.async_checkpoint = False
    model_cfg = preference.validate(config)
    params = lm.init(model_cfg, jax.random.key(0))
    arrays, stats = preference.make_pairs(config, "train", config.pairs.n)
    return config, model_cfg, params, arrays, stats


def _train(
    setup, tmp_path, *, kind="sigmoid", precompute=False, lora=None, ref_fn=preference.reference_logps, one=False, **h
):
    """Three steps of `preference_task` on the loop, data-parallel over 2 devices (or on one: cheaper to compile)."""
    config, model_cfg, params, arrays, stats = setup
    devices = jax.devices()[: 1 if one else 2]
    data = preference.PairData.make(arrays, config.train.batch_size, config.seed)
    mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.rules_from_config(config.mesh)
    task = preference.preference_task(
        model_cfg,
        params,
        data,
        kind=kind,
        hparams=dict(beta=0.1) | h,
        precompute_ref_logps=precompute,
        lora=lora,
        mesh=mesh,
        rules=rules,
        ref_logps_fn=ref_fn,
        data_stats=stats,
    )
    state = loop.train(config, str(tmp_path), task, devices=devices)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return task, jax.device_get(state.params), [m for m in metrics if "train/loss" in m]


def test_precomputed_reference_trains_bitwise_like_on_the_fly(setup, tmp_path):
    _, p_fly, m_fly = _train(setup, tmp_path / "fly")
    task, p_pre, m_pre = _train(setup, tmp_path / "pre", precompute=True)
    assert task.frozen is None  # one model in the step: the reference is only its cached columns
    # step 1: policy == reference, so Δ = 0 and the DPO loss is log 2, rewards 0
    assert m_fly[0]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert m_fly[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert [m["train/loss"] for m in m_fly] == [m["train/loss"] for m in m_pre]
    assert [m["train/rewards/margins"] for m in m_fly] == [m["train/rewards/margins"] for m in m_pre]
    for a, b in zip(jax.tree.leaves(p_fly), jax.tree.leaves(p_pre)):
        np.testing.assert_array_equal(a, b)
    assert m_fly[2]["train/loss"] < m_fly[0]["train/loss"]  # it learns (same batch at steps 1 and 3)
    assert "train/logits/chosen" in m_fly[0] and "train/data/dropped_identical" in m_fly[0]


def test_reference_free_kinds_never_run_the_reference(setup, tmp_path):
    def forbidden(*a, **k):
        raise AssertionError("a reference-free kind ran a reference forward pass")

    task, _, metrics = _train(setup, tmp_path, kind="simpo", ref_fn=forbidden, precompute=True, one=True, beta=2.0)
    assert task.frozen is None and len(metrics) == 3


@pytest.mark.slow
def test_orpo_is_reference_free_and_kinds_with_a_reference_call_it(setup, tmp_path):
    def forbidden(*a, **k):
        raise AssertionError("a reference-free kind ran a reference forward pass")

    task, _, metrics = _train(setup, tmp_path / "orpo", kind="orpo", ref_fn=forbidden, one=True)
    assert task.frozen is None and "train/log_odds_ratio" in metrics[0]
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return preference.reference_logps(*a, **k)

    _train(setup, tmp_path, kind=["sigmoid", "sft"], ref_fn=counting, one=True, weights=(1.0, 0.5))
    assert calls  # a kind with a reference does call it (traced once into the step)


def test_lora_reference_is_the_base_with_adapters_off(setup, tmp_path):
    task, adapters, metrics = _train(setup, tmp_path, lora=peft.LoraConfig(rank=4, alpha=8.0), one=True)
    assert set(task.frozen) == {"adapted"}  # the base once: policy and reference share it
    assert metrics[0]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)  # adapters start at B = 0
    assert metrics[2]["train/loss"] < metrics[0]["train/loss"]
    merged = preference.trained_policy(task, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(setup[2])


def test_bad_config_names_the_key(setup):
    config = setup[0]
    for key, value, match in (
        ("beta", 0.0, "beta"),
        ("epsilon", 0.5, "epsilon"),
        ("kind", "dpo", "kind"),
    ):
        c = config.copy_and_resolve_references()
        c.pref[key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            preference.validate(c)
    c = config.copy_and_resolve_references()
    c.pairs.n = 4
    with pytest.raises(config_lib.ConfigError, match="pairs.n"):
        preference.validate(c)


def test_pairs_kind_list_parses(setup):
    c = setup[0].copy_and_resolve_references()
    c.pref.kind = "sigmoid, sft"
    c.pref.weights = (1.0, 0.2)
    assert preference.kinds(c) == ("sigmoid", "sft")
    assert preference.loss_hparams(c)["weights"] == (1.0, 0.2)
    assert prefopt.needs_reference(preference.kinds(c))
