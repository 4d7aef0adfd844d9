"""What a `loop.Task` can ask of the one training loop beyond params, loss and batches: frozen param groups (by label
function and by the `train.frozen` config regexes), per-label settings, frozen inputs beside the params, user hooks,
every aux scalar logged (metrics.jsonl and TensorBoard), bitwise resume with all of them; and
`loss.sequence_logprobs`. A toy regression task that compiles in a moment, except the sequence log-prob test.
"""

import glob
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from framework import config as config_lib
from framework.models import lm
from framework.training import checkpoint, loop
from framework.training.loss import next_token_loss, sequence_logprobs
from framework.training.metrics import read_metrics

STEPS = 8
_AXES = {"embed": P(None, "embed"), "w": P("embed", "mlp"), "b": P("mlp")}


def _init(rng):
    k1, k2 = jax.random.split(rng)
    # A -0.0 in the group that gets frozen: "unchanged" means the very bits (p + 0 would flip its sign).
    embed = (1.0 + 0.1 * jax.random.normal(k1, (3, 4))).at[0, 0].set(-0.0)
    return {"embed": embed, "w": 0.1 * jax.random.normal(k2, (4, 2)), "b": jnp.zeros((2,))}


class Interrupt(KeyboardInterrupt):
    """A kill while fetching a batch."""


def _task(*, frozen=None, interrupt_at=None, **kw):
    """y = (x * sum(embed)) @ w + b regressed on a fixed map of x, or on x @ proj @ target with frozen inputs."""

    def loss_fn(params, batch, *rest):
        x = batch["x"]
        y = x @ rest[0]["proj"] @ rest[0]["target"] if rest else x[:, :2] - x[:, 2:]
        pred = (x * jnp.sum(params["embed"], axis=0)) @ params["w"] + params["b"]
        loss = jnp.mean((pred - y) ** 2)
        return loss, {"my_metric": 2.0 * loss + 1.0, "mean_pred": jnp.mean(pred)}

    def batches(start):
        for i in range(start, 10**9):
            if i == interrupt_at:
                raise Interrupt(f"interrupted before step {i}")
            yield {"x": np.random.RandomState(i).randn(8, 4).astype(np.float32)}

    return loop.Task(init_params=_init, logical_axes=_AXES, loss_fn=loss_fn, batches=batches, frozen=frozen, **kw)


def _config(**train):
    config = common.lm_experiment(size="tiny")
    config.train.update(
        dict(steps=STEPS, batch_size=8, lr=1e-2, warmup_steps=1, weight_decay=0.5, log_every=1, checkpoint_every=2)
    )
    config.train.progress = False
    config.train.update(train)
    return config


def _frozen_inputs(scale=1.0):
    rs = np.random.RandomState(7)
    return {"proj": (scale * rs.randn(4, 5)).astype(np.float32), "target": rs.randn(5, 2).astype(np.float32)}


def _bits(tree):
    return [(np.shape(x), np.asarray(x).tobytes()) for x in jax.tree.leaves(jax.device_get(tree))]


def _labels(params):
    return {"embed": "frozen", "w": "default", "b": "default"}


@pytest.fixture(scope="module")
def frozen_by_label(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("by_label"))
    return workdir, loop.train(_config(), workdir, _task(param_labels=_labels))


def test_a_frozen_group_stays_bitwise_unchanged_while_the_rest_moves(frozen_by_label, tmp_path):
    _, state = frozen_by_label
    init = jax.device_get(_init(jax.random.key(0)))  # the loop draws params from key(config.seed = 0)
    got = jax.device_get(state.params)
    np.testing.assert_array_equal(got["embed"].view(np.uint32), init["embed"].view(np.uint32))
    assert np.signbit(got["embed"][0, 0])
    for k in ("w", "b"):
        assert np.all(got[k] != init[k]), k
    # No optimizer moments for the frozen group (weight_decay=0.5 would have moved it, had it been decayed).
    assert not [x for x in jax.tree.leaves(state.opt_state) if np.shape(x) == (3, 4)]
    # The config regex gives the same groups, hence the same run, bit for bit.
    config = _config()
    config.train.frozen = ("emb.*",)
    by_regex = loop.train(config, str(tmp_path), _task())
    assert _bits(by_regex.params) == _bits(state.params)


def test_frozen_regexes_and_label_settings_are_validated(tmp_path):
    config = _config(steps=1)
    config.train.frozen = ("emb.*", "layers/.*")
    with pytest.raises(config_lib.ConfigError, match=r"'train.frozen': 'layers/\.\*' matches no param"):
        loop.train(config, str(tmp_path / "a"), _task())
    config.train.frozen = ("emb.*", "w", "b")
    with pytest.raises(ValueError, match="every param is frozen"):
        loop.train(config, str(tmp_path / "b"), _task())
    with pytest.raises(ValueError, match="label_settings names label 'head', which no param has"):
        loop.train(_config(steps=1), str(tmp_path / "c"), _task(label_settings={"head": None}))
    with pytest.raises(ValueError, match=r"label_settings\['default'\].*expected None \(frozen\) or a dict"):
        loop.train(_config(steps=1), str(tmp_path / "d"), _task(label_settings={"default": {"momentum": 0.9}}))


def test_label_settings_freeze_a_label_and_give_another_its_own_lr(tmp_path):
    labels = lambda p: {"embed": "embed", "w": "w", "b": "b"}
    settings = {"embed": None, "b": {"lr": 0.05, "weight_decay": 0.0}}
    state = loop.train(_config(), str(tmp_path), _task(param_labels=labels, label_settings=settings))
    init = jax.device_get(_init(jax.random.key(0)))
    assert _bits(state.params["embed"]) == _bits(init["embed"])
    records = read_metrics(str(tmp_path))
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 1, STEPS, 1e-3)
    sched_b = optax.warmup_cosine_decay_schedule(0.0, 0.05, 1, STEPS, 0.005)
    for r in records:
        np.testing.assert_allclose(r["train/lr"], float(sched(r["step"] - 1)), rtol=1e-6)
        np.testing.assert_allclose(r["train/lr/b"], float(sched_b(r["step"] - 1)), rtol=1e-6)


def _tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in workdir/tensorboard's event files, read record by record (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_every_aux_scalar_is_logged_to_metrics_jsonl_and_tensorboard(frozen_by_label):
    workdir, _ = frozen_by_label
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:  # log_every=1: each record is one step's values
        np.testing.assert_allclose(r["train/my_metric"], 2.0 * r["train/loss"] + 1.0, rtol=1e-6)
        assert np.isfinite(r["train/mean_pred"])
    tb = _tensorboard_scalars(workdir)
    for tag in ("train/my_metric", "train/mean_pred", "train/loss"):
        assert [s for s, _ in tb[tag]] == list(range(1, STEPS + 1)), tag
    np.testing.assert_allclose([v for _, v in tb["train/my_metric"]], [r["train/my_metric"] for r in records])


@pytest.mark.parametrize(
    "aux, match",
    [
        ({"per_row": jnp.zeros((8,))}, "'per_row' has shape \\(8,\\)"),
        ({"grad_norm": jnp.zeros(())}, "'grad_norm' takes the name of a metric the loop logs"),
    ],
)
def test_non_scalar_or_reserved_aux_is_an_error(tmp_path, aux, match):
    task = _task()
    task.loss_fn = lambda params, batch: (jnp.sum(params["w"]) + jnp.sum(batch["x"]), aux)
    with pytest.raises(ValueError, match=match):
        loop.train(_config(steps=1), str(tmp_path), task)


@jax.custom_vjp
def _refuses_gradients(x):
    return x


def _refuse_fwd(x):
    return x, None


def _refuse_bwd(_, g):
    raise AssertionError("a frozen input was differentiated")


_refuses_gradients.defvjp(_refuse_fwd, _refuse_bwd)


@pytest.fixture(scope="module")
def with_frozen_inputs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("frozen_inputs"))
    return workdir, loop.train(_config(), workdir, _task(frozen=_frozen_inputs(), param_labels=_labels))


def test_frozen_inputs_feed_the_loss_and_are_never_differentiated_updated_or_checkpointed(with_frozen_inputs, tmp_path):
    workdir, state = with_frozen_inputs
    ref = read_metrics(workdir)
    other = str(tmp_path)
    loop.train(_config(), other, _task(frozen=_frozen_inputs(scale=3.0), param_labels=_labels))
    assert read_metrics(other)[0]["train/loss"] != ref[0]["train/loss"], "the loss must see the frozen inputs"
    # Step 1's loss is the loss of the initial params on batch 0 against the frozen inputs' targets.
    p0, x = jax.device_get(_init(jax.random.key(0))), np.random.RandomState(0).randn(8, 4).astype(np.float64)
    f = _frozen_inputs()
    pred = (x * p0["embed"].sum(0)) @ p0["w"] + p0["b"]
    np.testing.assert_allclose(ref[0]["train/loss"], np.mean((pred - x @ f["proj"] @ f["target"]) ** 2), rtol=1e-5)
    # Not params, not optimizer state, not in the checkpoint: no array of their shapes anywhere in the state.
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
    ckpt.close()
    shapes = {np.shape(x) for x in jax.tree.leaves(restored)}
    assert (4, 5) not in shapes and (5, 2) not in shapes and "frozen_checksum" in meta
    # A loss that would fail if the loop took gradients through them (its custom VJP raises) trains fine.
    task = _task(frozen=_frozen_inputs())
    inner = task.loss_fn
    task.loss_fn = lambda params, batch, frozen: inner(params, batch, jax.tree.map(_refuses_gradients, frozen))
    loop.train(_config(steps=2), str(tmp_path / "refuse"), task)


def test_user_hooks_run_at_their_period_and_may_stop_the_run(tmp_path):
    seen = {"every3": [], "end_only": [], "each": []}

    def each(step, ctx):
        assert int(ctx.state.step) == step and "loss" in ctx.metrics
        seen["each"].append(step)

    task = _task(hooks=(loop.every(3, lambda s, c: seen["every3"].append(s)),))
    hooks = (loop.every(3, lambda s, c: seen["end_only"].append(s), at_end=False), each)
    loop.train(_config(), str(tmp_path / "a"), task, hooks=hooks)
    assert seen == {"every3": [3, 6, 8], "end_only": [3, 6], "each": list(range(1, STEPS + 1))}

    def stop_at_5(step, ctx):
        if step == 5:
            ctx.stop = "enough"

    workdir = str(tmp_path / "b")
    state = loop.train(_config(log_every=4), workdir, _task(), hooks=(stop_at_5,))
    assert int(state.step) == 5
    assert [r["step"] for r in read_metrics(workdir)] == [4, 5]  # the stopping step's metrics are flushed
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 5
    ckpt.close()


def test_resume_is_bitwise_exact_with_a_frozen_group_and_frozen_inputs(with_frozen_inputs, tmp_path, caplog):
    ref_dir, ref_state = with_frozen_inputs
    workdir = str(tmp_path)
    with pytest.raises(Interrupt):
        loop.train(_config(), workdir, _task(frozen=_frozen_inputs(), param_labels=_labels, interrupt_at=5))
    state = loop.train(_config(), workdir, _task(frozen=_frozen_inputs(), param_labels=_labels))
    assert int(state.step) == STEPS
    assert _bits((state.params, state.opt_state)) == _bits((ref_state.params, ref_state.opt_state))
    strip = lambda rs: [{k: v for k, v in r.items() if "_per_s" not in k and "time" not in k} for r in rs]
    assert strip(read_metrics(workdir)) == strip(read_metrics(ref_dir))
    # Resuming with other frozen inputs is allowed (the task supplies them) but warned about.
    with caplog.at_level("WARNING", logger="framework.training.loop"):
        loop.train(_config(steps=STEPS + 1), workdir, _task(frozen=_frozen_inputs(2.0), param_labels=_labels))
    assert "written under other frozen inputs" in caplog.text


def test_optimizer_override_trains_the_unfrozen_params_only(tmp_path):
    sgd = optax.sgd(0.1)
    task = _task(optimizer=sgd, param_labels=_labels)
    state = loop.train(_config(steps=1), str(tmp_path), task)
    params = _init(jax.random.key(0))
    grads = jax.grad(lambda p: task.loss_fn(p, next(task.batches(0)))[0])(params)
    np.testing.assert_allclose(state.params["w"], params["w"] - 0.1 * grads["w"], rtol=1e-5)
    assert _bits(state.params["embed"]) == _bits(params["embed"])
    assert "train/lr" not in read_metrics(str(tmp_path))[0]  # no schedule given with the optimizer: none logged


def test_sequence_logprobs_equals_a_hand_summed_log_softmax(tiny_cfg):
    rs = np.random.RandomState(0)
    B, T = 3, 8
    shapes = jax.eval_shape(lambda k: lm.init(tiny_cfg, k), jax.random.key(0))  # nothing to compile
    params = jax.tree.map(lambda x: jnp.asarray(0.3 * rs.randn(*x.shape), x.dtype), shapes)
    tokens = rs.randint(0, tiny_cfg.vocab_size, size=(B, T)).astype(np.int32)
    mask = (rs.rand(B, T) < 0.6).astype(np.float32)
    mask[2] = 0.0  # a row scoring nothing: 0 and 0, not NaN
    mask[:, 0] = 1.0  # ignored: nothing predicts the first token
    f = jax.jit(sequence_logprobs, static_argnames="cfg")
    logp, n = f(params, tiny_cfg, tokens, mask)
    logits = np.asarray(jax.jit(lm.apply, static_argnames="cfg")(params, tokens, tiny_cfg), np.float64)
    want, count = np.zeros(B), np.zeros(B)
    for b in range(B):
        for t in range(1, T):
            z = logits[b, t - 1]
            lsm = z - z.max() - np.log(np.sum(np.exp(z - z.max())))
            want[b] += mask[b, t] * lsm[tokens[b, t]]
            count[b] += mask[b, t]
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(n), count)
    assert float(logp[2]) == 0.0 and float(n[2]) == 0.0
    # The loss's convention: minus the summed log-probs over the summed counts is next_token_loss.
    loss, _ = next_token_loss(jnp.asarray(logits, jnp.float32), tokens, mask)
    np.testing.assert_allclose(-float(np.sum(logp)) / float(np.sum(n)), float(loss), rtol=1e-5)
    # Keyword arguments reach lm.forward: two packed segments of 4 score as the two sequences alone.
    seg = np.repeat([[1] * 4 + [2] * 4], B, axis=0).astype(np.int32)
    pos = np.tile(np.arange(4), 2)[None].repeat(B, 0).astype(np.int32)
    m2 = mask.copy()
    m2[:, 4] = 0.0  # the first token of segment 2 has no predictor inside its segment
    packed, _ = f(params, tiny_cfg, tokens, m2, segment_ids_BT=seg, positions_BT=pos)
    halves, _ = f(params, tiny_cfg, tokens.reshape(2 * B, 4), m2.reshape(2 * B, 4))
    np.testing.assert_allclose(np.asarray(packed), np.asarray(halves).reshape(B, 2).sum(1), rtol=1e-5, atol=1e-5)
    # Soft inputs: the lookup's own embeddings score the tokens exactly as the tokens do (tokens are the targets).
    embeds = jax.jit(lm.embed, static_argnames="cfg")(params, tokens, tiny_cfg)
    soft, n_soft = f(params, tiny_cfg, tokens, mask, embeds_BTD=embeds)
    np.testing.assert_allclose(np.asarray(soft), np.asarray(logp), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(n_soft), count)


def test_frozen_inputs_shard_by_their_logical_axes_or_are_replicated():
    from framework import sharding

    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    frozen = {"big": np.ones((16, 3), np.float32), "small": np.ones((3,), np.float32)}
    task = _task(frozen=frozen, frozen_logical_axes={"big": P("embed", None), "small": P(None)})
    placed, _, _ = loop._place_frozen(task, mesh, sharding.DEFAULT_RULES)
    assert placed["big"].sharding.spec == P("fsdp", None) and placed["small"].sharding.is_fully_replicated
    placed, _, _ = loop._place_frozen(_task(frozen=frozen), mesh, sharding.DEFAULT_RULES)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))
