"""Fault tolerance: exact resume after a real SIGKILL, SIGTERM pre-emption, damaged checkpoints, retention policies.

The kill/signal tests run `python -m scripts.launch` as real subprocesses on one CPU device (XLA_FLAGS stripped, as
in test_launch); the checkpoint tests run `loop.train` in-process on a toy task that compiles in a moment.
"""

import dataclasses
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from framework.training import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = [
    sys.executable,
    "-m",
    "scripts.launch",
    "--config=configs/lm/arith.py:size=tiny",
    "--config.train.batch_size=8",
    "--config.train.seq_len=40",  # the longest K=2 example is 36 tokens
    "--config.task.num_steps=(1,2)",
    "--config.train.log_every=1",
    "--config.train.warmup_steps=2",
    "--config.eval.problems_per_k=1",
    "--config.eval.decode_parity_problems=0",  # decode parity has its own tests; here it would only add compiles
    "--config.train.progress=False",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_runs():
    yield
    while _STARTED:  # a failed assertion must not leave training runs behind
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(workdir, *overrides):
    cmd = [*LAUNCH, f"--workdir={workdir}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _STARTED.append(proc)
    return proc


def _finish(proc, timeout=900):  # a hang guard: a loaded 2-core machine can take minutes
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err[-4000:]}"
    return out, err


def _logged_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written right now
    return steps


def _wait_for_step(proc, workdir, step, timeout=600):
    t0 = time.time()
    while not _logged_steps(workdir) or max(_logged_steps(workdir)) < step:
        assert proc.poll() is None, f"run ended (exit {proc.returncode}) before step {step}: {proc.stderr.read()}"
        assert time.time() - t0 < timeout, f"no step {step} after {timeout}s"
        time.sleep(0.02)


def _ckpt_steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _final_state(workdir, step):
    """The raw arrays of checkpoint `step` (restored on this process's first device)."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
        return jax.tree.map(np.asarray, ckptr.restore(path, target))


def _losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "train/loss" in r]


def test_sigkill_at_an_arbitrary_moment_then_rerun_gives_bitwise_identical_params(tmp_path):
    steps, rnd = 16, random.Random()
    kill_after = rnd.randint(3, 11)  # a logged step; the kill lands a random few ms later, mid-step or mid-save
    args = (f"--config.train.steps={steps}", "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=2")
    ref, victim = _start(tmp_path / "ref", *args), _start(tmp_path / "run", *args)
    _wait_for_step(victim, tmp_path / "run", kill_after)
    time.sleep(rnd.uniform(0, 0.05))
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(_logged_steps(tmp_path / "run"))
    assert killed_at < steps and steps not in _ckpt_steps(tmp_path / "run"), "killed too late to test anything"
    _finish(ref)
    _finish(_start(tmp_path / "run", *args))  # the same command again: resumes from the last complete checkpoint
    want, got = _final_state(tmp_path / "ref", steps), _final_state(tmp_path / "run", steps)
    assert int(got["step"]) == steps
    flat_want, flat_got = jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves_with_path(got)
    assert [p for p, _ in flat_want] == [p for p, _ in flat_got]
    for (path, a), (_, b) in zip(flat_want, flat_got):  # params, optimizer state, RNG: bit for bit
        np.testing.assert_array_equal(a, b, err_msg=f"{jax.tree_util.keystr(path)} (killed after step {killed_at})")
    # The resumed metrics.jsonl reads as one curve, identical to the uninterrupted run's.
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")


def test_sigterm_finishes_the_step_checkpoints_it_and_exits_0(tmp_path):
    proc = _start(tmp_path, "--config.train.steps=100000", "--config.train.checkpoint_every=100000")
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    signalled_after = max(_logged_steps(tmp_path))
    out, err = _finish(proc, timeout=300)
    saved = _ckpt_steps(tmp_path)
    assert len(saved) == 1 and signalled_after <= saved[0] < 100000, (saved, signalled_after)
    assert f"pre-empted (SIGTERM): checkpointed step {saved[0]}" in err
    assert max(_logged_steps(tmp_path)) == saved[0], "the step the checkpoint holds is the last one trained"
    assert not (tmp_path / "results").exists(), "a pre-empted run stops: no evaluation, no artifacts"
    state = _final_state(tmp_path, saved[0])
    assert int(state["step"]) == saved[0] and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ------------------------------------------------------------------------------------ checkpoints, in-process

_AXES = {"w": jax.sharding.PartitionSpec("embed", "mlp"), "b": jax.sharding.PartitionSpec("mlp")}


def _toy_task():
    def init_params(rng):
        return {"w": 0.1 * jax.random.normal(rng, (4, 2)), "b": jnp.zeros((2,))}

    def loss_fn(params, batch):
        loss = jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)
        return loss, {}

    def batches(start):
        for i in range(start, 10**9):
            x = np.random.RandomState(i).randn(8, 4).astype(np.float32)
            yield {"x": x, "y": x[:, :2] - x[:, 2:]}

    return loop.Task(init_params=init_params, logical_axes=_AXES, loss_fn=loss_fn, batches=batches)


def _config(**train):
    config = common.lm_experiment(size="tiny")
    config.train.update(dict(steps=6, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=2, progress=False))
    config.train.update(train)
    return config


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.opt_state, state.rng)))]


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy_ref")
    return loop.train(_config(), str(workdir), _toy_task())


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The files holding the arrays' bytes (orbax's OCDBT data files, in `d/` folders)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no data files under {step_dir}"
    return files


def _truncate(step_dir):
    """A copy cut short: every data file loses its second half."""
    for f in _data_files(step_dir):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "unreadable"


def _scramble(step_dir):
    """Bad bytes: the middle of every data file overwritten with noise."""
    rs = np.random.RandomState(0)
    for f in _data_files(step_dir):
        data = bytearray(f.read_bytes())
        lo, hi = len(data) // 4, len(data) - len(data) // 4
        data[lo:hi] = rs.randint(0, 256, size=hi - lo, dtype=np.uint8).tobytes()
        f.write_bytes(bytes(data))
    return "unreadable"


def _garble_record(step_dir):
    f = step_dir / "meta" / "metadata"
    f.write_text(f.read_text()[:7])
    return "unreadable"


def _flip_a_value(step_dir):
    """A change no file format catches: a restorable checkpoint holding one different number."""
    path = step_dir / "state"
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        tree = ckptr.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta))
    tree["params"]["w"] = tree["params"]["w"].at[0, 0].add(1e-3)
    tmp = step_dir.parent.parent / "rewritten"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp, tree)
    shutil.rmtree(path)
    shutil.move(tmp, path)
    return "checksum mismatch"


@pytest.mark.parametrize("damage", [_truncate, _scramble, _garble_record, _flip_a_value])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog, toy_reference, damage):
    workdir = tmp_path / "run"
    loop.train(_config(steps=4), str(workdir), _toy_task())  # checkpoints 2 and 4
    what = damage(workdir / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, logger="framework.training.checkpoint"):
        state = loop.train(_config(), str(workdir), _toy_task())
    warning = caplog.text
    assert "checkpoint 4 in" in warning and "falling back to step 2" in warning, warning
    assert what in warning, warning
    assert any((workdir / "checkpoints.corrupt").iterdir()), "the damaged checkpoint is moved aside, not deleted"
    # Retrained from step 2: the same parameters as the run that never saw a damaged checkpoint.
    assert int(state.step) == 6
    for a, b in zip(_leaves(state), _leaves(toy_reference)):
        np.testing.assert_array_equal(a, b)


def test_no_usable_checkpoint_is_an_error_listing_each_problem(tmp_path):
    loop.train(_config(steps=4), str(tmp_path), _toy_task())
    for step in (2, 4):
        _garble_record(tmp_path / "checkpoints" / str(step))
    with pytest.raises(checkpoint.CheckpointError, match=r"no usable checkpoint: checkpoint 4 .*; checkpoint 2 "):
        loop.train(_config(), str(tmp_path), _toy_task())


def test_async_saves_keep_the_newest_n_and_every_kth(tmp_path):
    config = _config(steps=12, checkpoint_every=1, keep_checkpoints=2, keep_checkpoint_every=5)
    state = loop.train(config, str(tmp_path), _toy_task())
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [5, 10, 11, 12]
    abstract = jax.eval_shape(lambda: state)
    for step in ckpt.all_steps():  # every kept checkpoint verifies against its checksums
        restored, meta = ckpt.restore(abstract, step)
        assert int(restored.step) == step and len(meta["checksums"]) == len(jax.tree.leaves(state))
    ckpt.close()


def test_a_checkpoint_of_another_model_is_an_error_and_stays_in_place(tmp_path):
    """A sound checkpoint whose parameters were renamed or reshaped since (a code or config change) is not damage:
    the run stops naming the differences and moves nothing (no fallback, no training from scratch over it)."""
    loop.train(_config(steps=4), str(tmp_path), _toy_task())
    task = dataclasses.replace(
        _toy_task(),  # "b" renamed "bias", "w" widened
        init_params=lambda rng: {"w": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))},
        logical_axes={"w": _AXES["w"], "bias": _AXES["b"]},
        loss_fn=lambda params, batch: (jnp.sum(params["w"]) + params["bias"][0], {}),
    )
    expected = r"checkpoint 4 .* another model: it lacks \['bias'\]; has \['b'\]; holds \['w'\] \(4, 2\) \(the model's"
    with pytest.raises(checkpoint.CheckpointMismatch, match=expected):
        loop.train(_config(), str(tmp_path), task)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert not (tmp_path / "checkpoints.corrupt").exists()
