"""SAE training infrastructure: exact resume from orbax checkpoints, NaN stops, sharding by config.mesh rules,
command-line overrides of every documented config key."""

import numpy as np
import pytest

from framework import sae, sharding
from framework.sae import train
from framework.training.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(2048, 16)).astype(np.float32)


def _cfg(**kw):
    return sae.default_config("topk", d_in=16, n_latents=64, k=4, steps_per_call=10, log_every=10, **kw)


class _Interrupt(Exception):
    pass


def _stop_after(monkeypatch, n_chunks, poison=False):
    """_Source.chunk raises after n_chunks calls (a kill), or returns NaN activations instead (poison)."""
    real, calls = train._Source.chunk, []

    def chunk(self, s):
        calls.append(s)
        xs, ys = real(self, s)
        if len(calls) > n_chunks:
            if not poison:
                raise _Interrupt
            xs = xs * np.nan
        return xs, ys

    monkeypatch.setattr(train._Source, "chunk", chunk)


def test_resume_equals_uninterrupted(x, tmp_path, monkeypatch):
    cfg = _cfg(dead_window=256)  # AuxK active, so since_fired matters for the result
    p_ref, m_ref = sae.fit(x, cfg, steps=40, batch_size=64, seed=0)
    with monkeypatch.context() as m:
        _stop_after(m, 3)  # chunks 1-2 done, checkpoint at step 20, killed during chunk 3
        with pytest.raises(_Interrupt):
            sae.fit(x, cfg, steps=40, batch_size=64, seed=0, checkpoint_dir=str(tmp_path), checkpoint_every=20)
    assert Checkpointer(str(tmp_path)).all_steps() == [20]
    p, m = sae.fit(x, cfg, steps=40, batch_size=64, seed=0, checkpoint_dir=str(tmp_path), checkpoint_every=20)
    assert m["resumed_from"] == 20
    for k in p_ref:
        np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(p_ref[k]), err_msg=k)
    assert [h["step"] for h in m["history"]] == [10, 20, 30, 40]
    assert m["history"] == m_ref["history"]
    # A finished run resumes at its last step and trains nothing; a different run refuses the directory.
    p2, m2 = sae.fit(x, cfg, steps=40, batch_size=64, seed=0, checkpoint_dir=str(tmp_path), checkpoint_every=20)
    assert m2["resumed_from"] == 40
    np.testing.assert_array_equal(np.asarray(p2["W_dec"]), np.asarray(p_ref["W_dec"]))
    with pytest.raises(ValueError, match="different SAE run"):
        sae.fit(x, cfg, steps=40, batch_size=64, seed=1, checkpoint_dir=str(tmp_path), checkpoint_every=20)


def test_nan_stops_without_checkpointing_it(x, tmp_path, monkeypatch):
    cfg = _cfg()
    _stop_after(monkeypatch, 2, poison=True)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 20"):
        sae.fit(x, cfg, steps=60, batch_size=64, seed=0, checkpoint_dir=str(tmp_path), checkpoint_every=20)
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [20]  # the good checkpoint stays the newest


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
