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
