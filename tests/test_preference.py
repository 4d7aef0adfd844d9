"""The preference trainer on the one loop: first-step values, precomputed == on-the-fly reference (bitwise),
reference-free kinds never touch the reference, LoRA with the base as reference, and config errors."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.preference.common import preference_experiment
from experiments import preference
from framework import config as config_lib
from framework import peft, prefopt, sharding
from framework.models import lm
from framework.training import loop

SEQ = 48  # the longest K<=2 pair is 36 tokens


@pytest.fixture(scope="module")
def setup():
    config = preference_experiment(size="tiny")
    config.model.update(max_seq_len=64, n_layers=1)  # one block: the trainer's plumbing, at half the compile time
    config.task.num_steps = (1, 2)
    config.pairs.n = 16  # two batches: steps 1 and 3 see the same one
    config.train.update(steps=3, batch_size=8, seq_len=SEQ, log_every=1, checkpoint_every=100, progress=False)
    config.train.update(lr=1e-2, warmup_steps=0)
    config.train.async_checkpoint = False
    model_cfg = preference.validate(config)
    params = lm.init(model_cfg, jax.random.key(0))
    arrays, stats = preference.make_pairs(config, "train", config.pairs.n)
    return config, model_cfg, params, arrays, stats


def _train(
    setup,
    tmp_path,
    *,
    kind="sigmoid",
    precompute=False,
    lora=None,
    ref_fn=preference.reference_logps,
    one=False,
    arrays=None,
    mesh=None,
    specs=None,
    **h,
):
    """Three steps of `preference_task` on the loop, data-parallel over 2 devices (or on one: cheaper to compile; or
    on the devices of `mesh`, {data, fsdp, tensor} sizes). `specs` (a dict) gets the trained params' mesh specs."""
    config, model_cfg, params, pair_arrays, stats = setup
    arrays = pair_arrays if arrays is None else arrays
    devices = jax.devices()[: 1 if one else 2]
    if mesh is not None:
        config = config.copy_and_resolve_references()
        config.mesh.update(mesh)
        devices = jax.devices()[: int(np.prod(list(mesh.values())))]
    data = preference.PairData.make(arrays, config.train.batch_size, config.seed)
    mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.rules_from_config(config.mesh)
    task = preference.preference_task(
        model_cfg,
        params,
        data,
        kind=kind,
        hparams=dict(beta=0.1) | h,
        precompute_ref_logps=precompute,
        lora=lora,
        mesh=mesh,
        rules=rules,
        ref_logps_fn=ref_fn,
        data_stats=stats,
    )
    state = loop.train(config, str(tmp_path), task, devices=devices)
    if specs is not None:
        specs.update(jax.tree.map(lambda x: x.sharding.spec, state.params))
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return task, jax.device_get(state.params), [m for m in metrics if "train/loss" in m]


FSDP_TP = dict(data=1, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def fly_run(setup, tmp_path_factory):
    """DPO, reference on the fly, FSDP x TP over 2 x 2 devices (the rules table's shardings), and its param specs."""
    specs = {}
    return _train(setup, tmp_path_factory.mktemp("fly"), mesh=FSDP_TP, specs=specs), specs


def _strip(spec):  # trailing None axes dropped
    return P(*tuple(spec)[: max([i + 1 for i, a in enumerate(spec) if a is not None], default=0)])


@pytest.mark.slow  # two train-step compiles on 4 devices (~13 s CPU): pays for the notebook in `make test`
def test_precomputed_reference_trains_bitwise_like_on_the_fly_under_fsdp_tp(setup, fly_run, tmp_path):
    (_, p_fly, m_fly), specs = fly_run
    # sharded as the rules table says (batch over fsdp, weights over fsdp x tensor), not silently replicated
    assert _strip(specs["layers"]["attn"]["q_proj"]["kernel"]) == P(None, "fsdp", "tensor")
    assert _strip(specs["layers"]["mlp"]["up_proj"]["kernel"]) == P(None, "fsdp", "tensor")
    task, p_pre, m_pre = _train(setup, tmp_path / "pre", precompute=True, mesh=FSDP_TP)
    assert task.frozen is None  # one model in the step: the reference is only its cached columns
    # step 1: policy == reference, so Δ = 0 and the DPO loss is log 2, rewards 0
    assert m_fly[0]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert m_fly[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert [m["train/loss"] for m in m_fly] == [m["train/loss"] for m in m_pre]
    assert [m["train/rewards/margins"] for m in m_fly] == [m["train/rewards/margins"] for m in m_pre]
    for a, b in zip(jax.tree.leaves(p_fly), jax.tree.leaves(p_pre)):
        np.testing.assert_array_equal(a, b)
    assert m_fly[2]["train/loss"] < m_fly[0]["train/loss"]  # it learns (same batch at steps 1 and 3)
    assert "train/logits/chosen" in m_fly[0] and "train/data/dropped_identical" in m_fly[0]


def _assert_same_training(a, b):
    """Same logged losses, margins, chosen log-probs and gradient norms at every step, and the same trained params,
    within fp32 tolerance.

    Params are compared per tensor in norm (relative 1e-4), not per element: Adam divides each gradient element by
    its own scale, so an element whose gradient is near fp32 rounding of the reduction moves by a sizeable fraction
    of its (lr 1e-2) step, while a mis-sharded step (an unreduced gradient, a wrong shard) is off by O(1)."""
    (_, pa, ma), (_, pb, mb) = a, b
    for key in ("train/loss", "train/rewards/margins", "train/logps/chosen", "train/grad_norm"):
        np.testing.assert_allclose([m[key] for m in ma], [m[key] for m in mb], rtol=1e-5, atol=1e-6, err_msg=key)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(pa), jax.tree.leaves(pb)):
        err = np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y))
        assert err <= 1e-4, (jax.tree_util.keystr(path), err)


@pytest.fixture(scope="module")
def one_run(setup, tmp_path_factory):
    return _train(setup, tmp_path_factory.mktemp("one"), one=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,precompute,q_spec",
    [
        (FSDP_TP, False, P(None, "fsdp", "tensor")),
        (dict(data=1, fsdp=4, tensor=1), False, P(None, "fsdp")),
        (dict(data=1, fsdp=1, tensor=4), True, P(None, None, "tensor")),
        (dict(data=2, fsdp=1, tensor=1), False, P()),
    ],
    ids=["fsdp2_tp2", "fsdp4", "tp4_precomputed", "dp2"],
)
def test_sharded_steps_equal_the_one_device_step(setup, fly_run, one_run, tmp_path, mode, precompute, q_spec):
    """DP, FSDP, TP and FSDP x TP (rules table) train like one device, within fp32 tolerance."""
    specs = {}
    run = fly_run[0] if mode is FSDP_TP else _train(setup, tmp_path, mesh=mode, precompute=precompute, specs=specs)
    _assert_same_training(run, one_run)
    assert _strip((fly_run[1] if mode is FSDP_TP else specs)["layers"]["attn"]["q_proj"]["kernel"]) == q_spec


def _task(setup, kind="sigmoid", **kw):
    """A `preference_task` on one device and its first batch (for checks that trace or evaluate one step)."""
    config, model_cfg, params, arrays, _ = setup
    data = preference.PairData.make(arrays, config.train.batch_size, config.seed)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    task = preference.preference_task(
        model_cfg, params, data, kind=kind, mesh=mesh, rules=sharding.rules_from_config(config.mesh), **kw
    )
    return task, next(task.batches(0))


def test_reference_free_kinds_never_run_the_reference(setup):
    """Building the task (precompute on) and tracing its step never call the reference for SimPO/ORPO; DPO's does."""

    def forbidden(*a, **k):
        raise AssertionError("a reference-free kind ran a reference forward pass")

    params = setup[2]
    for kind, beta in (("simpo", 2.0), ("orpo", 0.1)):
        task, batch = _task(setup, kind, hparams=dict(beta=beta), precompute_ref_logps=True, ref_logps_fn=forbidden)
        assert task.frozen is None and not set(preference.REF_KEYS) & set(batch)
        loss, metrics = jax.eval_shape(task.loss_fn, params, batch)
        assert loss.shape == () and "rewards/margins" in metrics
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return preference.reference_logps(*a, **k)

    task, batch = _task(setup, hparams=dict(beta=0.1), ref_logps_fn=counting)
    jax.eval_shape(task.loss_fn, params, batch, task.frozen)
    assert calls and set(task.frozen) == {"ref"}


@pytest.mark.slow
def test_orpo_is_reference_free_and_kinds_with_a_reference_call_it(setup, tmp_path):
    def forbidden(*a, **k):
        raise AssertionError("a reference-free kind ran a reference forward pass")

    task, _, metrics = _train(setup, tmp_path / "orpo", kind="orpo", ref_fn=forbidden, one=True)
    assert task.frozen is None and "train/log_odds_ratio" in metrics[0]
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return preference.reference_logps(*a, **k)

    _train(setup, tmp_path, kind=["sigmoid", "sft"], ref_fn=counting, one=True, weights=(1.0, 0.5))
    assert calls  # a kind with a reference does call it (traced once into the step)


def _kto_arrays(setup):
    config = setup[0]
    arrays, stats = preference.make_pairs(config, "train", config.pairs.n, unpaired=True)
    assert stats["rows"] == 2 * config.pairs.n and arrays["desirable"].sum() == config.pairs.n
    return {k: v[: 2 * config.train.batch_size] for k, v in arrays.items()}  # two batches: steps 1, 3 see one


@pytest.mark.slow  # step 1 == 0.5 and kl == 0 are also checked, with TRL's values, by the trainer golden test
def test_kto_step_on_unpaired_rows(setup):
    """KTO's step at the start: policy == reference, so ρ = 0, z0 = 0, every row's loss is 1 − σ(0) = 0.5."""
    config, model_cfg, params = setup[:3]
    data = preference.PairData.make(_kto_arrays(setup), config.train.batch_size, config.seed)
    task = preference.preference_task(model_cfg, params, data, kind="kto", hparams=dict(beta=0.1))
    assert set(task.frozen) == {"ref"}
    batch = next(task.batches(0))
    assert set(batch) == set(preference.KTO_KEYS)
    loss, metrics = jax.jit(task.loss_fn)(params, batch, task.frozen)
    assert float(loss) == pytest.approx(0.5, abs=1e-6) and float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["count/chosen"] + metrics["count/rejected"]) == config.train.batch_size
    pairs = preference.PairData.make(setup[3], config.train.batch_size, config.seed)
    with pytest.raises(ValueError, match="unpaired rows"):
        preference.preference_task(model_cfg, params, pairs, kind="kto", hparams=dict(beta=0.1))


@pytest.mark.slow
def test_kto_trains_on_unpaired_rows(setup, tmp_path):
    task, _, metrics = _train(setup, tmp_path, kind="kto", arrays=_kto_arrays(setup), one=True, beta=0.1)
    assert metrics[0]["train/loss"] == pytest.approx(0.5, abs=1e-6)
    assert metrics[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[2]["train/loss"] < metrics[0]["train/loss"]  # it learns (same batch at steps 1 and 3)
    assert metrics[2]["train/rewards/margins"] > 0.0
    assert all(m["train/kl"] >= 0.0 for m in metrics)  # z0 is clamped at 0
    pre, _, m_pre = _train(setup, tmp_path / "pre", kind="kto", arrays=_kto_arrays(setup), one=True, precompute=True)
    assert pre.frozen is None and [m["train/loss"] for m in m_pre] == [m["train/loss"] for m in metrics]


@pytest.mark.slow  # pays for the KTO trainer golden in `make test`; the slow LoRA training test checks step 1 too
def test_lora_reference_is_the_base_with_adapters_off(setup):
    """One evaluation of the step's loss: the adapters start at B = 0, so the policy is its reference (DPO loss log 2)
    and the base is held once, as the frozen input both share."""
    task, batch = _task(setup, hparams=dict(beta=0.1), lora=peft.LoraConfig(rank=4, alpha=8.0))
    assert set(task.frozen) == {"adapted"}
    adapters = task.init_params(None)
    loss, metrics = jax.jit(task.loss_fn)(adapters, batch, task.frozen)
    assert float(loss) == pytest.approx(np.log(2.0), abs=1e-6) and float(metrics["rewards/margins"]) == 0.0
    merged = preference.trained_policy(task, adapters)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(setup[2])):
        np.testing.assert_array_equal(a, b)  # B = 0: merging changes nothing


@pytest.mark.slow
def test_lora_trains_adapters_with_the_base_as_reference(setup, tmp_path):
    task, adapters, metrics = _train(setup, tmp_path, lora=peft.LoraConfig(rank=4, alpha=8.0), one=True)
    assert set(task.frozen) == {"adapted"}  # the base once: policy and reference share it
    assert metrics[0]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)  # adapters start at B = 0
    assert metrics[2]["train/loss"] < metrics[0]["train/loss"]
    merged = preference.trained_policy(task, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(setup[2])
    start = preference.trained_policy(task, task.init_params(None))
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(setup[2])):
        np.testing.assert_array_equal(a, b)  # B = 0 at the start: merging changes nothing


def test_bad_config_names_the_key(setup):
    config = setup[0]
    for key, value, match in (
        ("beta", 0.0, "beta"),
        ("epsilon", 0.5, "epsilon"),
        ("kind", "dpo", "kind"),
    ):
        c = config.copy_and_resolve_references()
        c.pref[key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            preference.validate(c)
    for key, value in (("n", 4), ("source", "sampled"), ("samples", 0), ("temperature", 0.0)):
        c = config.copy_and_resolve_references()
        c.pairs[key] = value
        with pytest.raises(config_lib.ConfigError, match=f"pairs.{key}"):
            preference.validate(c)
    for key, value in (("desirable_weight", -1.0), ("undesirable_weight", float("nan")), ("beta", 0.0)):
        c = config.copy_and_resolve_references()
        c.pref.kind = "kto"
        c.pref[key] = value
        with pytest.raises(config_lib.ConfigError, match=key):
            preference.validate(c)


def test_kto_config_validates():
    from configs.preference import kto

    c = kto.get_config("lr=3e-5,undesirable_weight=1.5")
    preference.validate(c)
    assert preference.kinds(c) == ("kto",) and c.train.batch_size == 32
    assert preference.loss_hparams(c) == dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)


def test_pairs_kind_list_parses(setup):
    c = setup[0].copy_and_resolve_references()
    c.pref.kind = "sigmoid, sft"
    c.pref.weights = (1.0, 0.2)
    assert preference.kinds(c) == ("sigmoid", "sft")
    assert preference.loss_hparams(c)["weights"] == (1.0, 0.2)
    assert prefopt.needs_reference(preference.kinds(c))


TRAINER_GOLDENS = pathlib.Path(__file__).parent / "assets" / "trl" / "trainer"


def _load_trainer_goldens(folder: pathlib.Path):
    """TRL's trainer-level goldens (scripts/golden/trl_trainer_goldens.py): the two Llamas, the batches, the steps."""
    from framework.models import hf

    cfg, policy = hf.load_hf_checkpoint(folder / "policy", scan_layers=False)
    _, ref = hf.load_hf_checkpoint(folder / "ref", scan_layers=False)
    record = json.loads((folder / "goldens.json").read_text())
    with np.load(folder / "batches.npz") as f:
        arrays = dict(f)
    return cfg, policy, ref, {c["trainer"]: c for c in record["cases"]}, arrays


@pytest.fixture(scope="module")
def trl_trainer():
    return _load_trainer_goldens(TRAINER_GOLDENS)


def _pad_to(x_NT, width):
    return np.pad(x_NT, ((0, 0), (0, width - x_NT.shape[1])))  # right padding: pad id 0, mask 0


@pytest.mark.parametrize(
    "trainer",
    # DPO's first step is also checked against live TRL by scripts/bench/preference.py; its losses by the loss goldens
    [pytest.param("DPOTrainer", marks=pytest.mark.slow), "KTOTrainer"],
)
def test_trainer_matches_trl_on_the_same_llama_and_batch(trl_trainer, trainer):
    _check_trainer_case(trl_trainer, trainer)


PARITY_PY = pathlib.Path(__file__).resolve().parents[1] / ".venv-parity" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.skipif(not PARITY_PY.exists(), reason="no .venv-parity (torch + trl)")
def test_trainer_matches_live_trl(tmp_path):
    """The same check against TRL run now (the golden script in the parity venv, into a temporary folder)."""
    import os
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "golden" / "trl_trainer_goldens.py"
    subprocess.run(
        [str(PARITY_PY), str(script), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        env=dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1"),
    )
    goldens = _load_trainer_goldens(tmp_path)
    for trainer in ("DPOTrainer", "KTOTrainer"):
        _check_trainer_case(goldens, trainer)


def _check_trainer_case(trl_trainer, trainer):
    """Lumen's trainer step (its `loop.Task` loss function, TRL's collated batch, the same safetensors, `ref_model`
    as the frozen reference) gives TRL's loss and logged metrics on step 1, and after one SGD step (lr 0.5) on step 2:
    forward, reference, metrics and gradient agree. With the policy as its own reference the loss is log 2 (DPO) or
    0.5 (KTO: ρ = 0, z0 = 0) and the margins and `kl` are 0. fp32 on both sides; the tolerance (1e-5 relative,
    1e-5 absolute) is float noise of two implementations' forwards summed over ~10 tokens."""
    cfg, policy, ref, cases, a = trl_trainer
    case = cases[trainer]
    if trainer == "DPOTrainer":
        ids, mask = a["dpo_input_ids"], a["dpo_completion_mask"].astype(np.float32)
        b = len(ids) // 2
        arrays = dict(chosen_tokens=ids[:b], chosen_mask=mask[:b], rejected_tokens=ids[b:], rejected_mask=mask[b:])
        kind, hparams = tuple(case["kind"]), dict(beta=case["beta"])
    else:
        width = max(a["kto_input_ids"].shape[1], a["kto_KL_input_ids"].shape[1])  # one width for rows and KL rows
        arrays = dict(
            tokens=_pad_to(a["kto_input_ids"], width),
            mask=_pad_to(a["kto_completion_mask"], width).astype(np.float32),
            kl_tokens=_pad_to(a["kto_KL_input_ids"], width),
            kl_mask=_pad_to(a["kto_KL_completion_mask"], width).astype(np.float32),
            desirable=a["kto_label"],
        )
        kind, hparams = "kto", case["hparams"]
    rows = len(next(iter(arrays.values())))
    data = preference.PairData.make(arrays, rows, 0)  # one batch (its row order is shuffled: every value is a mean)
    task = preference.preference_task(cfg, policy, data, kind=kind, hparams=hparams)
    other = ("sigmoid", "pairs") if kind == "kto" else ("kto", "unpaired rows")
    with pytest.raises(ValueError, match=other[1]):  # a kind on the other kind's data
        preference.preference_task(cfg, policy, data, kind=other[0], hparams=dict(beta=0.1))
    batch, frozen = next(task.batches(0)), {"ref": ref}
    assert set(batch) == set(preference.KTO_KEYS if kind == "kto" else preference.PAIR_KEYS)
    step_fn = jax.jit(jax.value_and_grad(lambda p, f: task.loss_fn(p, batch, f), has_aux=True))
    (loss, metrics), _ = step_fn(policy, {"ref": policy})  # policy == reference: ρ = 0, z0 = 0
    assert float(loss) == pytest.approx(0.5 if kind == "kto" else np.log(2.0), abs=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0 and float(metrics.get("kl", 0.0)) == 0.0
    params = policy
    for step, want in enumerate(case["steps"], 1):
        (loss, metrics), grads = step_fn(params, frozen)
        got = {"loss": float(loss)} | {k: float(metrics[k]) for k in want["metrics"] if k in metrics}
        expect = {"loss": want["loss"]} | {k: want["metrics"][k] for k in got if k != "loss"}
        for k in ("rewards/chosen", "rewards/margins", "logps/chosen", "logits/chosen") + (("kl",) * (kind == "kto")):
            assert k in got, f"{trainer} step {step}: Lumen does not log {k}"
        g, e = np.array(list(got.values())), np.array(list(expect.values()))
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=str(got))
        params = jax.tree.map(lambda p, g: p - case["lr"] * g, params, grads)
