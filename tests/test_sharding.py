"""Sharding on conftest's 8 simulated CPU devices: DP, FSDP, TP and FSDP+TP are config changes (config.mesh) that train
to the same losses as one device; FSDP splits params + optimizer state 8 ways; generation runs on a sharded model."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from framework import inference, sharding
from framework.models import lm
from framework.tasks import data
from framework.training import loop
from framework.training.loss import next_token_loss
from framework.training.metrics import read_metrics

STEPS = 5
# 8 query heads (TP over 8 splits them), 4 kv heads (split under tensor=4 and 2, replicated under tensor=8).
_MODEL = dict(d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=64)
MODES = {
    "dp": dict(data=8, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=8, tensor=1),
    "tp": dict(data=1, fsdp=1, tensor=8),
    "fsdp_tp": dict(data=1, fsdp=2, tensor=4),
}


def _config(mesh):
    config = common.lm_experiment(size="tiny")
    config.model.update(_MODEL)
    config.task.num_steps = (1, 2)
    config.train.update(
        dict(steps=STEPS, batch_size=8, seq_len=40, warmup_steps=1, log_every=1, checkpoint_every=STEPS, progress=False)
    )
    config.mesh.update(mesh)
    return config


def _task(config):
    model_cfg = lm.LMConfig.from_config(config.model)
    ds = data.make_dataset(seed=0, batch_size=8, seq_len=40, split="train", num_steps=(1, 2))

    def loss_fn(params, batch):
        return next_token_loss(lm.apply(params, batch["tokens"], model_cfg), batch["tokens"], batch["loss_mask"])

    def batches(start):
        for b in data.batch_iterator(ds, start):
            yield {"tokens": b["tokens"], "loss_mask": b["loss_mask"]}

    task = loop.Task(
        init_params=lambda rng: lm.init(model_cfg, rng),
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=loss_fn,
        batches=batches,
    )
    return model_cfg, task


def _train(tmp_path_factory, mesh, devices=None):
    config = _config(mesh)
    workdir = str(tmp_path_factory.mktemp("run"))
    state = loop.train(config, workdir, _task(config)[1], devices=devices)
    losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
    return state, losses


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return _train(tmp_path_factory, dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {}


def _run(runs, tmp_path_factory, mode):
    if mode not in runs:
        runs[mode] = _train(tmp_path_factory, MODES[mode])
    return runs[mode]


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_trains_to_the_one_device_losses(one_device, runs, tmp_path_factory, mode):
    assert jax.device_count() == 8
    ref_state, ref = one_device
    state, got = _run(runs, tmp_path_factory, mode)
    assert len(got) == len(ref) == STEPS
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # The mode did shard what its rules say (not a silently replicated run).
    q = state.params["layers"]["attn"]["q_proj"]["kernel"]  # [layers, D, H, Dh]
    mlp = state.params["layers"]["mlp"]["up_proj"]["kernel"]  # [layers, D, F]
    expect = {
        "dp": (P(), P()),
        "fsdp": (P(None, "fsdp"), P(None, "fsdp")),
        "tp": (P(None, None, "tensor"), P(None, None, "tensor")),
        "fsdp_tp": (P(None, "fsdp", "tensor"), P(None, "fsdp", "tensor")),
    }[mode]

    def strip(spec):  # trailing None axes dropped
        return P(*tuple(spec)[: max([i + 1 for i, a in enumerate(spec) if a is not None], default=0)])

    assert (strip(q.sharding.spec), strip(mlp.sharding.spec)) == expect
    mu = state.opt_state[1][0].mu["layers"]["attn"]["q_proj"]["kernel"]  # Adam's moment shards like its param
    assert mu.sharding.spec == q.sharding.spec


def test_fsdp_holds_an_eighth_of_params_and_optimizer_state_per_device(runs, tmp_path_factory):
    state, _ = _run(runs, tmp_path_factory, "fsdp")
    tree = (state.params, state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per_device = sharding.bytes_per_device(tree)
    assert len(per_device) == 8
    for device, held in per_device.items():
        assert abs(held - total / 8) <= 0.05 * total / 8, (device, held, total / 8)
    # Data parallel, for contrast, holds everything everywhere.
    dp_state, _ = _run(runs, tmp_path_factory, "dp")
    assert set(sharding.bytes_per_device((dp_state.params, dp_state.opt_state)).values()) == {total}


def test_generation_on_a_sharded_model_matches_the_host_copy(runs, tmp_path_factory):
    state, _ = _run(runs, tmp_path_factory, "fsdp_tp")
    model_cfg, _ = _task(_config(MODES["fsdp_tp"]))
    params = state.params
    assert not params["layers"]["mlp"]["up_proj"]["kernel"].sharding.is_fully_replicated
    prompts = [np.array([1, 5, 6, 7, 8], np.int32), np.array([1, 9, 10], np.int32)]
    sharded = inference.generate(params, model_cfg, prompts, max_new_tokens=6, stop_tokens=())
    host = inference.generate(jax.device_get(params), model_cfg, prompts, max_new_tokens=6, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(host.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(host.logprobs), rtol=1e-5, atol=1e-5)


def test_rules_come_from_the_config_and_bad_entries_name_themselves():
    assert dict(sharding.rules_from_config(common.mesh_config())) == dict(sharding.DEFAULT_RULES)
    custom = sharding.rules_from_config(common.mesh_config(embed="", mlp="fsdp,tensor"))
    assert dict(custom)["embed"] is None and dict(custom)["mlp"] == ("fsdp", "tensor")
    with pytest.raises(ValueError, match=r"mesh.rules.mlp = 'tensr'"):
        sharding.rules_from_config(common.mesh_config(mlp="tensr"))
    with pytest.raises(ValueError, match="unknown logical axes"):
        common.mesh_config(mpl="tensor")


def test_a_dim_the_mesh_cannot_split_is_reported(tiny_cfg):
    # tiny_cfg: 4 query heads, 2 kv heads. tensor=8 divides neither; tensor=2 divides both.
    axes, shapes = lm.logical_axes(tiny_cfg), jax.eval_shape(lambda: lm.init(tiny_cfg, jax.random.key(0)))
    lines = sharding.unsplit_dims(axes, shapes, sharding.make_mesh(dict(data=1, fsdp=1, tensor=8)))
    assert any(line.startswith("heads=4 is not divisible by mesh tensor=8") for line in lines), lines
    assert any(line.startswith("kv_heads=2 is not divisible by mesh tensor=8") for line in lines), lines
    assert sharding.unsplit_dims(axes, shapes, sharding.make_mesh(dict(data=4, fsdp=1, tensor=2))) == []


def test_each_process_loads_only_its_rows():
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    assert sharding.process_rows(mesh, 16) == (0, 16)  # one process holds every row
    full = data.make_dataset(seed=3, batch_size=8, seq_len=40, num_steps=(1, 2), pack=True)
    part = data.make_dataset(seed=3, batch_size=8, seq_len=40, num_steps=(1, 2), pack=True, rows=(4, 8))
    for i in (0, 7):
        for k, v in part[i].items():
            np.testing.assert_array_equal(v, full[i][k][4:8])
    with pytest.raises(ValueError, match=r"rows = \(4, 9\); expected \(lo, hi\) with 0 <= lo < hi <= batch_size = 8"):
        data.make_dataset(seed=3, batch_size=8, seq_len=40, num_steps=(1, 2), rows=(4, 9))


def test_activation_constraints_apply_inside_the_rules_context():
    # Under the legacy `with mesh:` flax dropped these silently (FSDP then all-gathered activations, not weights).
    import flax.linen as nn

    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    x = np.ones((8, 4, 16), np.float32)
    with sharding.rules_context(mesh):
        y = jax.jit(lambda x: nn.with_logical_constraint(x * 2, ("batch", "seq", "embed")))(x)
        jaxpr = str(jax.make_jaxpr(lambda x: nn.with_logical_constraint(x, ("batch", "seq", "embed")))(x))
    assert "sharding_constraint" in jaxpr
    assert tuple(y.sharding.spec)[:1] == ("fsdp",)  # the batch dim split over fsdp, as the rule says
