"""SAE training infrastructure, shared with the training loop: exact resume from orbax checkpoints (metrics.jsonl
included), non-finite updates stopped or skipped, sharding by config.mesh rules, command-line overrides of every
documented config key."""

import json

import numpy as np
import pytest

from framework import sae, sharding
from framework.sae import source, train
from framework.training.checkpoint import Checkpointer
from framework.training.metrics import read_metrics


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(2048, 16)).astype(np.float32)


def _cfg(**kw):
    return sae.default_config("topk", d_in=16, n_latents=64, k=4, steps_per_call=10, log_every=10, **kw)


class _Interrupt(Exception):
    pass


def _stop_after(monkeypatch, n_chunks, poison=False):
    """Source.chunk raises after n_chunks calls (a kill), or returns NaN activations instead (poison)."""
    real, calls = source.Source.chunk, []

    def chunk(self, s):
        calls.append(s)
        xs, ys = real(self, s)
        if len(calls) > n_chunks:
            if not poison:
                raise _Interrupt
            xs = xs * np.nan
        return xs, ys

    monkeypatch.setattr(source.Source, "chunk", chunk)


def test_resume_equals_uninterrupted(x, tmp_path, monkeypatch):
    cfg = _cfg(dead_window=256)  # AuxK active, so since_fired matters for the result
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    p_ref, m_ref = sae.fit(x, cfg, steps=40, batch_size=64, seed=0, metrics_dir=str(ref_dir))
    kw = dict(steps=40, batch_size=64, seed=0, checkpoint_dir=str(run_dir / "ckpt"), checkpoint_every=20)
    with monkeypatch.context() as m:
        _stop_after(m, 3)  # chunks 1-2 done, checkpoint at step 20, killed during chunk 3
        with pytest.raises(_Interrupt):
            sae.fit(x, cfg, metrics_dir=str(run_dir), **kw)
    assert Checkpointer(str(run_dir / "ckpt")).all_steps() == [20]
    assert [r["step"] for r in read_metrics(str(run_dir))] == [10, 20]
    with open(run_dir / "metrics.jsonl", "a") as f:  # what a kill after logging past the checkpoint leaves
        f.write(json.dumps({"step": 30, "train/loss": 123.0}) + '\n{"step": 4')
    p, m = sae.fit(x, cfg, metrics_dir=str(run_dir), **kw)
    assert m["resumed_from"] == 20
    for k in p_ref:
        np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(p_ref[k]), err_msg=k)
    assert [h["step"] for h in m["history"]] == [10, 20, 30, 40]
    assert m["history"] == m_ref["history"]
    # metrics.jsonl: one train/ record per log window, the stale ones dropped, equal to the uninterrupted run's.
    records = read_metrics(str(run_dir))
    assert records == read_metrics(str(ref_dir)) and [r["step"] for r in records] == [10, 20, 30, 40]
    assert {"train/loss", "train/fvu", "train/l0", "train/grad_norm", "train/lr", "train/nonfinite_steps"} <= set(
        records[-1]
    )
    assert records[-1]["train/loss"] == pytest.approx(m_ref["history"][-1]["loss"])
    assert (run_dir / "tensorboard").is_dir()
    # A finished run resumes at its last step and trains nothing; a different run refuses the directory.
    p2, m2 = sae.fit(x, cfg, metrics_dir=str(run_dir), **kw)
    assert m2["resumed_from"] == 40 and read_metrics(str(run_dir)) == records
    np.testing.assert_array_equal(np.asarray(p2["W_dec"]), np.asarray(p_ref["W_dec"]))
    with pytest.raises(ValueError, match="different SAE run"):
        sae.fit(x, cfg, **dict(kw, seed=1))


def test_nan_stops_without_checkpointing_it(x, tmp_path, monkeypatch):
    cfg = _cfg()
    _stop_after(monkeypatch, 2, poison=True)
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradients at step 20; the update was not app"):
        sae.fit(x, cfg, steps=60, batch_size=64, seed=0, checkpoint_dir=str(tmp_path), checkpoint_every=20)
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [20]  # the good checkpoint stays the newest


def test_nonfinite_skip_drops_the_updates_and_counts_them(x, tmp_path, monkeypatch):
    cfg = _cfg(lr_decay="none")  # a constant LR: the first 20 steps do not depend on the run's length
    p_20, _ = sae.fit(x, cfg, steps=20, batch_size=64, seed=0)
    _stop_after(monkeypatch, 2, poison=True)  # steps 20..39 see NaN activations
    p, m = sae.fit(x, cfg, steps=40, batch_size=64, seed=0, nonfinite="skip", metrics_dir=str(tmp_path))
    assert m["nonfinite_steps"] == 20
    assert [h["nonfinite_steps"] for h in m["history"]] == [0, 0, 10, 20]
    assert [r["train/nonfinite_steps"] for r in read_metrics(str(tmp_path))] == [0, 0, 10, 20]
    for k in p_20:  # every update of steps 20..39 was dropped whole
        np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(p_20[k]), err_msg=k)


def test_nonfinite_policy_checked(x):
    with pytest.raises(ValueError, match=r"nonfinite = 'ignore'; expected one of \('stop', 'skip'\)"):
        sae.fit(x, _cfg(), steps=10, batch_size=64, nonfinite="ignore")


def test_checkpoint_every_checked(x, tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint_every = 15; expected a multiple of 10"):
        sae.fit(x, _cfg(), steps=40, batch_size=64, checkpoint_dir=str(tmp_path), checkpoint_every=15)


def test_sharded_fit_matches_single_device(x):
    from configs import common

    # batch over data (4), latents over tensor (2): what config.mesh and its rules table ask for
    mesh_cfg = dict(data=4, fsdp=1, tensor=2, rules=dict(common.SHARDING_RULES))
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_from_config(mesh_cfg)
    cfg = _cfg(aux_k=8, dead_window=128)
    p1, m1 = sae.fit(x, cfg, steps=20, batch_size=64, seed=0)
    p2, m2 = sae.fit(x, cfg, steps=20, batch_size=64, seed=0, mesh=mesh, rules=rules)
    for k in p1:
        np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    assert m1["final"]["fvu"] == pytest.approx(m2["final"]["fvu"], rel=1e-4)
    state = train.SAEState(step=np.int32(0), params=dict(p2), buffers={}, opt_state=(), since_fired=p2["b_enc"])
    sh = train.state_shardings(state, mesh, rules)
    assert tuple(sh.params["W_dec"].spec) == ("tensor", None) and tuple(sh.params["W_enc"].spec) == (None, "tensor")
    assert tuple(sh.since_fired.spec) == ("tensor",) and tuple(sh.params["b_dec"].spec) in ((), (None,))


def _leaves(c, prefix=""):
    from ml_collections import config_dict

    for k in c.keys():
        v = c[k]
        if isinstance(v, config_dict.ConfigDict):
            yield from _leaves(v, prefix + k + ".")
        else:
            yield prefix + k, v, (c.get_ref(k).get_type() if v is None else type(v))


def test_every_config_key_overrides_from_the_command_line():
    """scripts.launch parses `--config.<key>=<value>` for every leaf of an SAE experiment config (one process)."""
    import json
    import subprocess
    import sys

    from configs.sae import transcoder

    samples = {int: ("7", 7), float: ("0.25", 0.25), str: ("blocks.0.resid_post", "blocks.0.resid_post")}
    samples[tuple] = ("(1.0, 2.0)", [1.0, 2.0])
    args, want = [], {}
    for key, v, typ in _leaves(transcoder.get_config()):
        if v is None:  # an unset key (e.g. sae.l1_coeff of a TopK config, lm.workdir): a typed placeholder
            text, value = samples[typ]
        elif isinstance(v, bool):
            text, value = str(not v), not v
        elif isinstance(v, (int, float)):
            text, value = repr(v * 2), v * 2
        elif isinstance(v, tuple):
            text, value = repr(v), list(v)
        else:
            text, value = v, v
        args.append(f"--config.{key}={text}")
        want[key] = value
    assert "--config.sae.d_out=128" in args and "--config.sae.l1_coeff=0.25" in args
    code = "import sys; from absl import flags; import scripts.launch; flags.FLAGS(sys.argv); "
    code += "print(flags.FLAGS.config.to_json())"
    argv = [sys.executable, "-c", code, "--config=configs/sae/transcoder.py", "--workdir=unused", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    for key, value in want.items():
        got_v = got
        for part in key.split("."):
            got_v = got_v[part]
        assert got_v == pytest.approx(value), key
    assert len(want) > 100 and got["sae"]["d_out"] == 128 and got["sae"]["l1_coeff"] == 0.25
