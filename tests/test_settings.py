"""Typed settings: an experiment's config parsed once (`RunSettings`, train_lm's `Spec`) and read below as objects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from experiments import train_lm
from framework import config as config_lib
from framework.models import lm
from framework.training import optim
from framework.training.settings import MeshSettings, RunSettings, TrainSettings, config_digest


def test_train_settings_read_like_the_section_they_parse():
    config = common.lm_experiment(size="tiny")
    run = RunSettings.from_config(config)
    assert run.seed == config.seed
    assert run.train.steps == config.train.steps and run.train.lr == config.train.lr
    assert run.train["seq_len"] == config.train.seq_len  # a key the loop does not read stays readable
    as_dict = {k: v for k, v in config.train.to_dict().items()}
    assert dict(run.train) == {k: tuple(v) if isinstance(v, list) else v for k, v in as_dict.items()}
    assert dict(run.mesh)["rules"] == dict(config.mesh.rules) and run.mesh["data"] == config.mesh.data


def test_absent_keys_stay_absent_and_required_ones_are_named():
    train = TrainSettings.from_config({"steps": 3, "batch_size": 8, "checkpoint_every": 1})
    assert "lr" not in train and train.get("lr") is None and "checkpoint_every" in train
    with pytest.raises(KeyError):
        optim.make_optimizer(train)  # the optimiser still names what the config lacks
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        TrainSettings.from_config({"batch_size": 8})
    with pytest.raises(config_lib.ConfigError, match="train.batch_size.*integer"):
        TrainSettings.from_config({"steps": 3, "batch_size": 2.5})
    with pytest.raises(config_lib.ConfigError, match="mesh.shards"):
        MeshSettings.from_config({"data": -1, "shards": 2})


def test_digest_is_the_configs_and_ignores_only_steps():
    config = common.lm_experiment(size="tiny")
    run = RunSettings.from_config(config)
    assert run.digest == config_digest(config)
    assert run.replace_train(steps=7).digest == run.digest
    changed = run.replace_train(lr=1e-2)
    assert changed.digest != run.digest and changed.train.lr == 1e-2
    config.train.lr = 1e-2
    assert changed.digest == config_digest(config)  # the same digest as the config it stands for


def test_optimiser_from_settings_equals_the_one_from_the_config():
    config = common.lm_experiment(size="tiny")
    train = RunSettings.from_config(config).train
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
    grads = jax.tree.map(lambda x: 0.1 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), params)
    outs = []
    for source in (config.train, train):
        tx = optim.make_optimizer(source)
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
        outs.append(updates)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), *outs)


def test_train_lm_parses_once_and_reads_the_spec_below(monkeypatch):
    config = common.mod10_lm(steps=2)
    spec = train_lm.parse(config)
    assert spec.model == lm.LMConfig.from_config(config.model) and spec.task.modulus == 10
    assert spec.knobs == train_lm.knobs(config)

    def reparsed(*a, **k):
        raise AssertionError("the config was parsed again below the experiment's boundary")

    def model_from(cfg):  # model code normalises an LMConfig it is given; parsing a mapping again is the error
        return cfg if isinstance(cfg, lm.LMConfig) else reparsed()

    monkeypatch.setattr(lm.LMConfig, "from_config", model_from)
    monkeypatch.setattr(train_lm, "knobs", reparsed)
    model_cfg, task = train_lm.make_task(spec)
    batch = next(task.batches(0))
    assert model_cfg == spec.model and batch["tokens"].shape == (32, 80)
