"""The DPO family against golden values made by real TRL (tests/assets/trl, scripts/golden/trl_goldens.py), the DPO
gradient's closed form, properties of the kinds, and bad-input errors."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framework import prefopt

ASSETS = pathlib.Path(__file__).parent / "assets" / "trl"
ROOT = pathlib.Path(__file__).parent.parent
PARITY_PY = ROOT / ".venv-parity" / "bin" / "python"
TOL = dict(rtol=1e-6, atol=1e-6)


def _load(folder: pathlib.Path):
    x = dict(np.load(folder / "inputs.npz"))
    return x, json.loads((folder / "goldens.json").read_text())


def lumen_case(x, case) -> tuple[float, dict]:
    """Lumen's (loss, metrics) for one golden case, on the same per-sequence inputs TRL saw."""
    h = dict(case["hparams"])
    if case["trainer"] == "KTOTrainer":
        loss_B, m = prefopt.kto_loss(
            x["kto_policy_logps"],
            x["kto_ref_logps"],
            x["kto_desirable"],
            x["kto_kl_policy_logps"],
            x["kto_kl_ref_logps"],
            **h,
        )
        return float(jnp.mean(loss_B)), m
    lengths = dict(chosen_len_B=x["chosen_len"], rejected_len_B=x["rejected_len"])
    refs = (x["ref_chosen_logps"], x["ref_rejected_logps"])
    if case["trainer"] == "DPOTrainer":
        kw = dict(lengths, chosen_logits_sum_B=x["chosen_logits_sum"], rejected_logits_sum_B=x["rejected_logits_sum"])
    elif case["trainer"] == "CPOTrainer" and case["kind"] == ["cdpo"]:
        kw = dict(lengths)
    else:  # SimPO / ORPO: reference-free
        refs, kw = (None, None), dict(lengths)
        if case["kind"] == ["orpo"]:
            h["chosen_nll"] = float(x["chosen_nll"])
    loss_B, m = prefopt.preference_loss(case["kind"], x["chosen_logps"], x["rejected_logps"], *refs, **kw, **h)
    return float(jnp.mean(loss_B)), m


def check_case(x, case):
    loss, metrics = lumen_case(x, case)
    np.testing.assert_allclose(loss, case["loss"], **TOL, err_msg=f"{case['kind']} loss")
    for name, want in case["metrics"].items():
        assert name in metrics, f"{case['kind']}: TRL logs {name!r}, Lumen does not"
        np.testing.assert_allclose(float(metrics[name]), want, **TOL, err_msg=f"{case['kind']} {name}")


X, GOLDENS = _load(ASSETS)


@pytest.mark.parametrize("case", GOLDENS["cases"], ids=lambda c: f"{c['trainer']}-{'+'.join(c['kind'])}")
def test_matches_trl_goldens(case):
    check_case(X, case)


def test_goldens_cover_every_trl_kind():
    covered = {k for c in GOLDENS["cases"] for k in c["kind"]}
    # alphadpo has no TRL implementation (TRL's AlphaPO is a different reward transform); tested by its properties.
    assert covered == (set(prefopt.KINDS) - {"alphadpo"}) | {"kto"}


def _trl_here() -> bool:
    try:
        import torch  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.skipif(not (PARITY_PY.exists() or _trl_here()), reason="trl is not importable and no .venv-parity")
def test_live_against_trl(tmp_path):
    """Fresh inputs (another seed) through real TRL now, not only the committed goldens: in process when trl is
    importable here, else in the parity venv."""
    if _trl_here():
        from scripts.golden import trl_goldens

        x = trl_goldens.make_inputs(7)
        goldens = {"cases": trl_goldens.cases(x)}
    else:
        subprocess.run(
            [str(PARITY_PY), "scripts/golden/trl_goldens.py", "--out", str(tmp_path), "--seed", "7"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env=dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1"),
        )
        x, goldens = _load(tmp_path)
    for case in goldens["cases"]:
        check_case(x, case)


def test_dpo_gradient_is_closed_form():
    """d ℓ(βΔ)/d logπ(y_w) = −β σ(−βΔ), d/d logπ(y_l) = +β σ(−βΔ) (per pair; the mean divides by B)."""
    beta = 0.3
    lw, ll, rw, rl = (
        jnp.asarray(X[k]) for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    )

    def total(lw, ll):
        return jnp.sum(prefopt.preference_loss("sigmoid", lw, ll, rw, rl, beta=beta)[0])

    g_w, g_l = jax.grad(total, argnums=(0, 1))(lw, ll)
    delta = (lw - rw) - (ll - rl)
    want = beta * jax.nn.sigmoid(-beta * delta)
    np.testing.assert_allclose(g_w, -want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_l, want, rtol=1e-6, atol=1e-7)


def test_robust_is_unbiased_under_flips():
    """rDPO: (1−ε)·L(Δ) + ε·L(−Δ) = ℓ(βΔ), the clean DPO loss, for every Δ."""
    d = jnp.linspace(-30.0, 30.0, 41)
    zero = jnp.zeros_like(d)
    loss = functools.partial(prefopt.preference_loss, "robust", beta=0.2, epsilon=0.3)
    mixed = 0.7 * loss(d, zero, zero, zero)[0] + 0.3 * loss(-d, zero, zero, zero)[0]
    clean = prefopt.preference_loss("sigmoid", d, zero, zero, zero, beta=0.2)[0]
    np.testing.assert_allclose(mixed, clean, rtol=1e-5, atol=1e-6)


def test_alphadpo_at_alpha_zero_is_simpo_and_reference_matters_otherwise():
    args = (X["chosen_logps"], X["rejected_logps"], X["ref_chosen_logps"], X["ref_rejected_logps"])
    kw = dict(chosen_len_B=X["chosen_len"], rejected_len_B=X["rejected_len"], beta=2.0, gamma=0.5)
    a0 = prefopt.preference_loss("alphadpo", *args, alpha=0.0, **kw)[0]
    simpo = prefopt.preference_loss("simpo", *args[:2], **kw)[0]
    np.testing.assert_allclose(a0, simpo, rtol=1e-6, atol=1e-7)
    a1 = prefopt.preference_loss("alphadpo", *args, alpha=0.5, **kw)[0]
    assert not np.allclose(a1, simpo)


def test_weighted_kinds_are_the_weighted_sum():
    args = (X["chosen_logps"], X["rejected_logps"], X["ref_chosen_logps"], X["ref_rejected_logps"])
    both = prefopt.preference_loss(["sigmoid", "hinge"], *args, weights=(0.25, 2.0))[0]
    parts = [prefopt.preference_loss(k, *args)[0] for k in ("sigmoid", "hinge")]
    np.testing.assert_allclose(both, 0.25 * parts[0] + 2.0 * parts[1], rtol=1e-6)


def test_jits_with_traced_inputs():
    f = jax.jit(functools.partial(prefopt.preference_loss, "ipo", beta=0.1))
    args = (X["chosen_logps"], X["rejected_logps"], X["ref_chosen_logps"], X["ref_rejected_logps"])
    lengths = dict(chosen_len_B=X["chosen_len"], rejected_len_B=X["rejected_len"])
    np.testing.assert_allclose(f(*args, **lengths)[0], prefopt.preference_loss("ipo", *args, **lengths)[0], rtol=1e-6)


@pytest.mark.parametrize(
    "kind, kw, field",
    [
        ("dpo", {}, "kind"),
        ("sigmoid", dict(beta=0.0), "beta"),
        ("sigmoid", dict(beta=-1.0), "beta"),
        ("robust", dict(epsilon=0.5), "epsilon"),
        ("cdpo", dict(epsilon=-0.1), "epsilon"),
        ("exo_pair", dict(epsilon=0.0), "epsilon"),
        (["sigmoid", "sft"], dict(weights=(1.0,)), "weights"),
        ("sigmoid", dict(temperature=1.0), "temperature"),
    ],
)
def test_bad_hparams_name_the_field(kind, kw, field):
    args = (X["chosen_logps"], X["rejected_logps"], X["ref_chosen_logps"], X["ref_rejected_logps"])
    with pytest.raises(ValueError, match=field):
        prefopt.preference_loss(kind, *args, **kw)


def test_bad_inputs_name_the_field():
    lw, ll, rw, rl = X["chosen_logps"], X["rejected_logps"], X["ref_chosen_logps"], X["ref_rejected_logps"]
    nan = lw.copy()
    nan[3] = np.nan
    with pytest.raises(ValueError, match=r"chosen_logps_B\[3\]"):
        prefopt.preference_loss("sigmoid", nan, ll, rw, rl)
    inf = rl.copy()
    inf[0] = -np.inf
    with pytest.raises(ValueError, match=r"ref_rejected_logps_B\[0\]"):
        prefopt.preference_loss("sigmoid", lw, ll, rw, inf)
    zero = X["rejected_len"].copy()
    zero[2] = 0
    with pytest.raises(ValueError, match=r"rejected_len_B\[2\]"):
        prefopt.preference_loss("ipo", lw, ll, rw, rl, chosen_len_B=X["chosen_len"], rejected_len_B=zero)
    with pytest.raises(ValueError, match="needs reference"):
        prefopt.preference_loss("sigmoid", lw, ll)
    with pytest.raises(ValueError, match="needs completion lengths"):
        prefopt.preference_loss("simpo", lw, ll)
    with pytest.raises(ValueError, match="rejected_logps_B has shape"):
        prefopt.preference_loss("sigmoid", lw, ll[:3], rw, rl)
    with pytest.raises(ValueError, match="desirable_B"):
        prefopt.kto_loss(lw, rw, np.ones(3), lw, rw)
    with pytest.raises(ValueError, match="undesirable_weight"):
        prefopt.kto_loss(lw, rw, np.ones(len(lw)), lw, rw, undesirable_weight=-1.0)


def test_kinds_and_reference_needs():
    assert not prefopt.needs_reference(["simpo", "orpo"]) and prefopt.needs_reference(["simpo", "sigmoid"])
    assert set(prefopt.REFERENCE_FREE) <= set(prefopt.KINDS)
    for kind in prefopt.KINDS:  # every kind documents its formula
        fn = getattr(sys.modules["framework.prefopt.losses"], kind)
        assert fn.__doc__ and any(sym in fn.__doc__ for sym in "ℓσ²Σβ"), kind
