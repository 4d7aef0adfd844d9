"""The training stack: masked loss, optimizer schedule and decay mask, and the generic loop's checkpoints, exact
resume, metrics and non-finite handling (`loop.train` on a tiny LM over the real arithmetic data pipeline)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from framework.models import lm
from framework.tasks import data
from framework.training import checkpoint, loop, optim
from framework.training.loss import next_token_loss
from framework.training.metrics import read_metrics
from framework.training.state import TrainState

# ----------------------------------------------------------------------------------------------------------- loss


def test_masked_loss_equals_numpy_cross_entropy():
    rs = np.random.RandomState(0)
    B, T, V = 2, 5, 7
    logits = rs.randn(B, T, V).astype(np.float32) * 2
    tokens = rs.randint(0, V, size=(B, T)).astype(np.int32)
    mask = np.array([[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]], np.float32)
    loss, metrics = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))

    # By hand: position t-1 predicts token t, counted iff mask[t]; mask[:, 0] never matters.
    terms, correct = [], 0
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                z = logits[b, t - 1].astype(np.float64)
                logp = z - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
                terms.append(-logp[tokens[b, t]])
                correct += int(np.argmax(z) == tokens[b, t])
    assert len(terms) == 5
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss_sum"]), np.sum(terms), rtol=1e-6)
    assert float(metrics["tokens"]) == 5 and float(metrics["correct"]) == correct
    # A mask on position 0 is ignored (nothing predicts the first token); an all-zero mask gives 0, not NaN.
    loss0, _ = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask).at[:, 0].set(1.0))
    assert float(loss0) == float(loss)
    empty, m = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.zeros((B, T)))
    assert float(empty) == 0.0 and float(m["tokens"]) == 0.0


# ------------------------------------------------------------------------------------------------------ optimizer


def test_lr_schedule_warms_up_then_cosine_decays_to_min_ratio():
    tc = dict(steps=110, warmup_steps=10, lr=2e-3, min_lr_ratio=0.1)
    sched = optim.lr_schedule(tc)
    lr, end = 2e-3, 2e-4
    for step in range(0, 11):
        np.testing.assert_allclose(float(sched(step)), lr * step / 10, rtol=1e-6, atol=1e-12)
    for step in (10, 35, 60, 85, 110):
        frac = (step - 10) / 100
        expected = end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))
        np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(sched(110)), end, rtol=1e-6)
    np.testing.assert_allclose(float(sched(500)), end, rtol=1e-6)  # stays at the floor past the end
    lrs = [float(sched(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_applies_to_matrices_only(tiny_cfg):
    # The real LM params tree (shapes from eval_shape: nothing to compile), filled with random values.
    shapes = jax.eval_shape(lambda k: lm.init(tiny_cfg, k), jax.random.key(0))
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda x: jnp.asarray(rs.randn(*x.shape), x.dtype), shapes)
    mask = optim._decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    off = {k for k, v in flat.items() if not v}
    assert off == {
        "['embed']['embedding']",
        "['final_norm']['scale']",
        "['layers']['attn_norm']['scale']",
        "['layers']['mlp_norm']['scale']",
    }
    # Behaviourally: with zero gradients Adam's step is 0, so only decayed leaves move, by exactly lr * wd * p.
    tc = dict(common.train_config(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.5, grad_clip=1.0))
    tx = optim.make_optimizer(tc)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = jax.tree_util.keystr(path)
        p = params
        for k in path:
            p = p[k.key]
        expected = -0.1 * 0.5 * p if flat[name] else jnp.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-9, err_msg=name)


# ----------------------------------------------------------------------------------------------------------- loop

STEPS = 8
_MODEL = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def _config(**train):
    config = common.lm_experiment(size="tiny")
    config.model.update(_MODEL)
    config.task.num_steps = (1, 2)
    config.train.update(
        dict(
            steps=STEPS,
            batch_size=8,
            seq_len=40,
            lr=3e-3,
            warmup_steps=2,
            log_every=1,
            checkpoint_every=2,
            keep_checkpoints=3,
            progress=False,
        )
    )
    config.train.update(train)
    return config


class Interrupt(KeyboardInterrupt):
    """What Ctrl-C (or a pre-empted job) looks like to the loop."""


def _lm_task(config, *, interrupt_at=None, log=None):
    """A tiny-LM task over the arithmetic data (as train_lm builds it); fetching batch `interrupt_at` raises."""
    model_cfg = lm.LMConfig.from_config(config.model)
    ds = data.make_dataset(
        seed=config.seed,
        batch_size=config.train.batch_size,
        seq_len=config.train.seq_len,
        split="train",
        num_steps=tuple(config.task.num_steps),
    )

    def loss_fn(params, batch):
        return next_token_loss(lm.apply(params, batch["tokens"], model_cfg), batch["tokens"], batch["loss_mask"])

    def batches(start):  # a generator: `log` records `start` only once a batch is actually drawn
        if log is not None:
            log.append(start)
        for i, b in enumerate(data.batch_iterator(ds, start), start):
            if i == interrupt_at:
                raise Interrupt(f"interrupted before step {i}")
            yield {"tokens": b["tokens"], "loss_mask": b["loss_mask"]}

    return loop.Task(
        init_params=lambda rng: lm.init(model_cfg, rng),
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=loss_fn,
        batches=batches,
        flops_per_example=lm.flops_per_token(model_cfg, config.train.seq_len) * config.train.seq_len,
    )


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    config = _config()
    state = loop.train(config, workdir, _lm_task(config))
    return workdir, state


def test_uninterrupted_run_writes_metrics_checkpoints_and_config(uninterrupted):
    workdir, state = uninterrupted
    assert int(state.step) == STEPS and int(state.nonfinite_steps) == 0 and int(state.first_nonfinite) == -1
    records = read_metrics(workdir)
    # log_every=1: one record per step, the first step included (its compile time is left out of throughput).
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert np.isfinite(r["train/loss"]) and r["train/nonfinite_steps"] == 0
        assert 0 <= r["train/token_accuracy"] <= 1 and r["train/grad_norm"] > 0
    assert all(r["train/step_time_s"] > 0 and r["train/model_tflops_per_s"] > 0 for r in records[1:])
    losses = _losses(workdir)
    assert losses[STEPS] < losses[1], "a few steps of AdamW should lower the loss"
    # The logged lr is the schedule at the update's step (step 0 of the warm-up: lr 0).
    sched = optim.lr_schedule(_config().train)
    for r in records:
        np.testing.assert_allclose(r["train/lr"], float(sched(r["step"] - 1)), rtol=1e-6)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == json.loads(json.dumps(_config().to_dict(), default=str))
    # Saved every 2 steps, the newest keep_checkpoints=3 kept.
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [4, 6, 8]
    ckpt.close()


def test_resume_after_interruption_continues_the_same_loss_curve(uninterrupted, tmp_path):
    ref_dir, ref_state = uninterrupted
    workdir = str(tmp_path)
    config = _config()
    starts = []
    # Interrupted while fetching batch 5: steps 0..4 ran, metrics logged through step 5, last checkpoint at 4.
    with pytest.raises(Interrupt):
        loop.train(config, workdir, _lm_task(config, interrupt_at=5, log=starts))
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5]
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    state = loop.train(config, workdir, _lm_task(config, log=starts))
    assert starts == [0, 4], "the resumed run must ask the data for batch 4 onwards"
    assert int(state.step) == STEPS
    # metrics.jsonl reads as one curve: step 5 of the interrupted run was dropped, then written again.
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, STEPS + 1))
    ref, got = _losses(ref_dir), _losses(workdir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    # On CPU the resumed run is bitwise identical: same programs, same data, the exact state restored.
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)]
    for a, b in zip(_leaves(state), _leaves(ref_state)):
        np.testing.assert_array_equal(a, b)


def test_rerun_after_an_interruption_before_the_first_checkpoint_starts_a_clean_curve(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    workdir, config = str(tmp_path), _config()
    with pytest.raises(Interrupt):  # one step ran and was logged; the first checkpoint (step 2) never came
        loop.train(config, workdir, _lm_task(config, interrupt_at=1))
    assert [r["step"] for r in read_metrics(workdir)] == [1]
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == []
    loop.train(config, workdir, _lm_task(config))
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, STEPS + 1)), "stale records left behind"
    assert _losses(workdir) == _losses(ref_dir)


def test_completed_run_resumes_without_retraining(uninterrupted):
    ref_dir, ref_state = uninterrupted
    before, fetched = read_metrics(ref_dir), []
    state = loop.train(_config(), ref_dir, _lm_task(_config(), log=fetched))
    assert fetched == [], "a finished run must not draw a single batch"
    assert int(state.step) == STEPS and read_metrics(ref_dir) == before
    for a, b in zip(_leaves(state), _leaves(ref_state)):
        np.testing.assert_array_equal(a, b)


# A toy regression task (compiles in a moment) for the loop's generic machinery: batch i is a pure function of i,
# batches listed in `poison` give a NaN loss and NaN gradients, and the aux metrics carry no token counts.
_TOY_AXES = {"w": jax.sharding.PartitionSpec("embed", "mlp"), "b": jax.sharding.PartitionSpec("mlp")}


def _toy_task(poison=(), eval_fn=None):
    def init_params(rng):
        return {"w": 0.1 * jax.random.normal(rng, (4, 2)), "b": jnp.zeros((2,))}

    def loss_fn(params, batch):
        pred = batch["x"] @ params["w"] + params["b"]
        loss = jnp.mean((pred - batch["y"]) ** 2) * (1.0 + jnp.mean(batch["poison"]))
        return loss, {"mse": loss}

    def batches(start):
        i = start
        while True:
            rs = np.random.RandomState(i)
            x = rs.randn(8, 4).astype(np.float32)
            bad = np.full((8,), np.nan if i in poison else 0.0, np.float32)
            yield {"x": x, "y": x[:, :2] - x[:, 2:], "poison": bad}
            i += 1

    return loop.Task(init_params=init_params, logical_axes=_TOY_AXES, loss_fn=loss_fn, batches=batches, eval_fn=eval_fn)


def _toy_state(config):
    # The TrainState layout loop.train checkpoints, to restore its checkpoints outside the loop.
    params = _toy_task().init_params(jax.random.key(0))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optim.make_optimizer(config.train).init(params),
        rng=jax.random.key_data(jax.random.key(0)),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite=jnp.full((), -1, jnp.int32),
    )


def test_nonfinite_stop_raises_naming_the_step_and_no_checkpoint_holds_it(tmp_path):
    config = _config(nonfinite="stop", log_every=3, checkpoint_every=2, keep_checkpoints=10)
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradients at step 4\b"):
        loop.train(config, str(tmp_path), _toy_task(poison={4}))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    # Checkpoint 4 is the state before the bad update (batch 4 = step 4); none is written after it.
    assert ckpt.all_steps() == [2, 4]
    abstract = jax.eval_shape(lambda: _toy_state(config))
    for step in (2, 4):
        state, _ = ckpt.restore(abstract, step)
        assert bool(checkpoint.all_finite(state.params)) and int(state.first_nonfinite) == -1
    ckpt.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [3]


def test_nonfinite_skip_counts_skipped_steps_and_finishes(tmp_path):
    config = _config(nonfinite="skip", log_every=4, checkpoint_every=4)
    state = loop.train(config, str(tmp_path), _toy_task(poison={1, 5}))
    assert int(state.step) == STEPS
    assert int(state.nonfinite_steps) == 2 and int(state.first_nonfinite) == 1
    assert bool(checkpoint.all_finite(state.params)) and bool(checkpoint.all_finite(state.opt_state))
    records = read_metrics(str(tmp_path))
    assert [(r["step"], r["train/nonfinite_steps"]) for r in records] == [(4, 1), (8, 2)]
    assert "train/token_accuracy" not in records[0]  # the toy task counts no tokens
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [4, 8]
    ckpt.close()


def test_a_nonfinite_update_is_not_applied():
    config = _config()
    task = _toy_task(poison={1})
    tx, schedule = optim.make_optimizer(config.train), optim.lr_schedule(config.train)
    step_fn = jax.jit(loop.make_train_step(task.loss_fn, tx, schedule))
    batches = task.batches(0)
    state, metrics = step_fn(_toy_state(config), next(batches))
    assert bool(jnp.isfinite(metrics["loss"])) and int(state.nonfinite_steps) == 0
    new, metrics = step_fn(state, next(batches))
    assert not bool(jnp.isfinite(metrics["loss"]))
    assert int(new.step) == 2 and int(new.nonfinite_steps) == 1 and int(new.first_nonfinite) == 1
    jax.tree.map(np.testing.assert_array_equal, (new.params, new.opt_state), (state.params, state.opt_state))
    new, _ = step_fn(new, next(batches))  # and the next finite batch is applied again
    assert not np.array_equal(np.asarray(new.params["w"]), np.asarray(state.params["w"]))
    assert int(new.first_nonfinite) == 1


@pytest.mark.parametrize("eval_every, expected", [(0, [8]), (3, [3, 6, 8])])
def test_eval_runs_every_eval_every_steps_and_at_the_end(tmp_path, eval_every, expected):
    config = _config(eval_every=eval_every, log_every=4, checkpoint_every=8)
    seen = []

    def eval_fn(state):
        seen.append(int(state.step))
        return {"score": float(state.step)}

    loop.train(config, str(tmp_path), _toy_task(eval_fn=eval_fn))
    assert seen == expected
    assert [(r["step"], r["eval/score"]) for r in read_metrics(str(tmp_path)) if "eval/score" in r] == [
        (s, float(s)) for s in expected
    ]


def test_extending_train_steps_continues_the_run_and_other_changes_warn(tmp_path, caplog):
    workdir = str(tmp_path)
    assert loop.config_digest(_config(steps=4)) == loop.config_digest(_config(steps=6))
    assert loop.config_digest(_config(lr=1e-3)) != loop.config_digest(_config())
    loop.train(_config(steps=4, log_every=2, checkpoint_every=2), workdir, _toy_task())
    with caplog.at_level("WARNING", logger="framework.training.loop"):
        state = loop.train(_config(steps=6, log_every=2, checkpoint_every=2), workdir, _toy_task())
    assert int(state.step) == 6 and "different config" not in caplog.text
    # The schedule spans train.steps, so extending the run re-shapes it from the resumed step: said, with both lrs.
    was, now = (float(optim.lr_schedule(_config(steps=n).train)(4)) for n in (4, 6))
    assert "train.steps changed from 4 to 6 since the checkpoint at step 4" in caplog.text
    assert f"lr {was:.4g} at step 4 for 4 steps, {now:.4g} for 6" in caplog.text and was != now
    assert [r["step"] for r in read_metrics(workdir)] == [2, 4, 6]
    with caplog.at_level("WARNING", logger="framework.training.loop"):
        loop.train(_config(steps=8, log_every=2, checkpoint_every=2, lr=1e-3), workdir, _toy_task())
    assert "resuming from a checkpoint written under a different config" in caplog.text


def test_stop_when_ends_at_the_first_eval_meeting_it_and_a_rerun_trains_no_further(tmp_path, caplog):
    workdir, seen = str(tmp_path), []

    def eval_fn(state):  # a "quality" that crosses 0.5 at step 6
        seen.append(int(state.step))
        return {"score": int(state.step) / 12, "loss": 1.0}

    config = _config(steps=12, eval_every=3, log_every=4, checkpoint_every=4, stop_when="score>=0.5")
    with caplog.at_level("INFO", logger="framework.training.loop"):  # stopping as asked is news, not a warning
        state = loop.train(config, workdir, _toy_task(eval_fn=eval_fn))
    assert int(state.step) == 6 and seen == [3, 6]
    assert "step 6 meets train.stop_when 'score>=0.5'" in caplog.text
    # The stopping step is checkpointed (off the checkpoint_every grid) with the criterion, and its train metrics
    # (steps 5-6, after the step-4 log) are flushed.
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 6
    restored, meta = ckpt.restore(jax.eval_shape(lambda: _toy_state(config)))
    assert meta["stopped_early"] == {"criterion": "score>=0.5", "value": 0.5}
    ckpt.close()
    assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [4, 6]
    # Rerunning the same command does not train (no eval, no new metrics); a changed criterion trains on.
    before = read_metrics(workdir)
    again = loop.train(config, workdir, _toy_task(eval_fn=eval_fn))
    assert int(again.step) == 6 and seen == [3, 6] and read_metrics(workdir) == before
    on = loop.train(
        _config(steps=12, eval_every=3, log_every=4, checkpoint_every=4, stop_when="loss<=0.5"),
        workdir,
        _toy_task(eval_fn=eval_fn),
    )
    assert int(on.step) == 12 and seen == [3, 6, 9, 12]


@pytest.mark.parametrize(
    "spec, eval_every, match",
    [
        ("score>0.5", 3, "is not '<eval metric> >= <number>'"),
        ("score>=high", 3, "is not '<eval metric> >= <number>'"),
        ("score>=0.5", 0, "needs periodic evaluation"),
        ("accuracy>=0.5", 3, "the eval returns no metric 'accuracy'; it returns \\['score'\\]"),
    ],
)
def test_stop_when_errors_name_the_key(tmp_path, spec, eval_every, match):
    config = _config(steps=4, eval_every=eval_every, stop_when=spec)
    with pytest.raises(ValueError, match=match) as err:
        loop.train(config, str(tmp_path), _toy_task(eval_fn=lambda state: {"score": 0.0}))
    assert "train.stop_when" in str(err.value)


def test_parse_stop_when():
    assert loop.parse_stop_when("") is None
    assert loop.parse_stop_when(" eval/token_accuracy >= 0.98 ") == ("token_accuracy", ">=", 0.98)
    assert loop.parse_stop_when("loss<=1e-2") == ("loss", "<=", 0.01)


def test_format_metrics_prints_labelled_lines_flattening_nested_dicts():
    from framework.training.metrics import format_metrics

    text = format_metrics(
        "parity:", {"greedy": {"tokens_identical": True, "gap": 2.5e-6}, "steps": 3, "hist": [1, 2], "ce": None}
    )
    assert text.splitlines() == [
        "parity:",
        "  greedy/tokens_identical  True",
        "  greedy/gap               2.5e-06",
        "  steps                    3",
        "  ce                       None",
    ]
    assert "hist" not in format_metrics("m:", {"hist": 1.0, "x": 0.5}, skip=("hist",))
