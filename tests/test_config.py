"""Config validation (experiments.train_lm.validate): unknown keys, wrong types and bad combinations fail before
anything compiles, with a message naming the dotted key; every shipped config file loads and validates."""

import importlib

import jax
import ml_collections
import pytest

from configs import common
from experiments import train_lm
from framework.config import ConfigError, check_against
from framework.models import lm


def _default():
    config = common.lm_experiment(size="tiny")
    config.lock()
    return config


def test_default_config_validates_and_returns_the_model_config():
    model_cfg = train_lm.validate(_default())
    assert isinstance(model_cfg, lm.LMConfig)
    assert model_cfg.d_model == common.MODEL_SIZES["tiny"]["d_model"] and model_cfg.vocab_size == 24
    train_lm.validate(common.lm_experiment())  # the schema itself (size small)


@pytest.mark.parametrize(
    "arg, size", [("size=tiny", "tiny"), ("size=small", "small"), ("size=base", "base"), (None, "small")]
)
def test_arith_variants_load_and_validate(arg, size):
    config = importlib.import_module("configs.lm.arith").get_config(arg)
    assert config.model.d_model == common.MODEL_SIZES[size]["d_model"]
    assert config.experiment == "train_lm"
    train_lm.validate(config)
    with pytest.raises(AttributeError):  # locked: a typo in an override cannot add a key
        config.train.stepz = 3


def test_quickstart_loads_and_validates():
    config = importlib.import_module("configs.quickstart").get_config()
    train_lm.validate(config)


_TRAINING_CONFIGS = [
    "configs.quickstart",
    "configs.lm.arith",
    *(f"configs.sae.{a}" for a in ("topk", "batchtopk", "jumprelu", "relu", "gated", "transcoder")),
    "configs.scaling.default",
    "configs.scaling.tiny",
]


@pytest.mark.parametrize("module", _TRAINING_CONFIGS)
def test_every_training_config_has_the_foundation_keys(module):
    """seed, train.steps, train.checkpoint_every, model.* and mesh.* exist everywhere, and a model override reaches
    the model that the experiment builds (in the sae/scaling configs `model` is the LM's own section)."""
    config = importlib.import_module(module).get_config()
    assert isinstance(config.seed, int)
    assert config.train.steps > 0 and config.train.checkpoint_every > 0
    assert {"d_model", "n_layers", "vocab_size"} <= set(config.model) and "data" in config.mesh
    config.model.d_model = 96
    config.train.steps = 7
    lm_section = {"sae": lambda c: c.lm.train_lm, "tts": lambda c: c.policy.train_lm}.get(
        config.experiment, lambda c: c
    )(config)
    assert lm_section.model.d_model == 96
    if config.experiment == "tts":
        assert lm_section.train.steps == 7


def test_unknown_size_names_the_choices():
    with pytest.raises(ValueError, match=r"'huge' is not one of \['base', 'small', 'tiny'\]"):
        importlib.import_module("configs.lm.arith").get_config("size=huge")
    with pytest.raises(ValueError, match=r"config argument 'sise=tiny'.*\['size'\]"):
        importlib.import_module("configs.lm.arith").get_config("sise=tiny")


def _with(mutate):
    config = _default()
    mutate(config)
    return config


def _set(path, value):
    def mutate(config):
        *sections, key = path.split(".")
        node = config
        for s in sections:
            node = node[s]
        with node.ignore_type():  # wrong types on purpose: bypass ConfigDict's own override check
            node[key] = value

    return mutate


def _add(path, value):
    def mutate(config):
        config.unlock()
        _set(path, value)(config)
        config.lock()

    return mutate


@pytest.mark.parametrize(
    "mutate, key, match",
    [
        # unknown keys
        (_add("train.stepz", 3), "train.stepz", r"unknown config key\(s\) \['train.stepz'\]"),
        (_add("optimizer", 1), "optimizer", r"unknown config key\(s\) \['optimizer'\]"),
        (_add("model.n_layer", 3), "model.n_layer", r"unknown config key\(s\) \['model.n_layer'\]"),
        # wrong types
        (_set("train.steps", "10"), "train.steps", r"'train.steps' must be of type int, got str '10'"),
        (_set("train.lr", "3e-4"), "train.lr", r"'train.lr' must be of type float"),
        (_set("train.steps", 10.0), "train.steps", r"'train.steps' must be of type int, got float"),
        (_set("train.progress", 1), "train.progress", r"'train.progress' must be of type bool"),
        (_set("model.n_layers", True), "model.n_layers", r"'model.n_layers' must be of type int, got True"),
        (_set("train", 5), "train", r"'train' must be a section"),
        # bad combinations and values
        (_set("train.seq_len", 32), "train.seq_len", r"'train.seq_len': 32 is shorter than the longest example"),
        (_set("train.seq_len", 512), "train.seq_len", r"'train.seq_len': 512 exceeds model.max_seq_len=256"),
        (_set("model.vocab_size", 32), "model.vocab_size", r"'model.vocab_size': must equal .* \(24\), got 32"),
        (_set("train.batch_size", 12), "train.batch_size", r"'train.batch_size': 12 is not divisible by .* = 8"),
        (_set("train.steps", 0), "train.steps", r"'train.steps': must be positive, got 0"),
        (_set("train.nonfinite", "ignore"), "train.nonfinite", r"'train.nonfinite': must be 'stop' or 'skip'"),
        (_set("task.loss_on", "prompt"), "task.loss_on", r"'task.loss_on': must be one of"),
        (_set("model.remat", "half"), "model.remat", r"model.remat must be one of"),
        (_set("mesh.data", 3), "mesh", r"config section 'mesh': .*needs 3 devices, 8 available"),
        (_set("task.num_steps", (3, 1)), "task", r"config section 'task'"),
        (_set("train.stop_when", "acc>0.9"), "train.stop_when", r"is not '<eval metric> >= <number>'"),
        (_set("train.stop_when", "accuracy>=0.9"), "train.stop_when", r"metric 'accuracy' is not one of the eval's"),
        (_set("train.stop_when", "loss<=0.1"), "train.stop_when", r"needs train.eval_every > 0"),
    ],
)
def test_invalid_configs_name_the_key(mutate, key, match):
    assert jax.device_count() == 8  # the mesh-divisibility cases assume conftest's 8 CPU devices
    config = _with(mutate)
    with pytest.raises(ConfigError, match=match) as info:
        train_lm.validate(config)
    assert key in str(info.value)
    assert isinstance(info.value, ValueError)


def test_n_heads_not_divisible_by_n_kv_heads_names_both():
    config = _default()
    config.model.n_heads, config.model.n_kv_heads = 6, 4
    with pytest.raises(ConfigError) as info:
        train_lm.validate(config)
    assert "model.n_heads (6) must be divisible by model.n_kv_heads (4)" in str(info.value)


def test_check_against_reports_missing_keys_and_accepts_ints_for_floats():
    ref = ml_collections.ConfigDict(dict(a=1.0, b=dict(c=None, d=(1, 2))))
    check_against(ml_collections.ConfigDict(dict(a=2, b=dict(c="anything", d=[3]))), ref)
    with pytest.raises(ConfigError, match=r"missing config key\(s\) \['b.d'\]"):
        check_against(ml_collections.ConfigDict(dict(a=1.0, b=dict(c=None))), ref)
