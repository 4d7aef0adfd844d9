"""framework.peft: LoRA / rsLoRA / DoRA / PiSSA / QLoRA adapters on the LM, merge/unmerge, adapter-only training and
checkpoints, LoRA+ learning rates, adapter training on the one loop.  fp32 throughout; tolerances 2e-5 (float
re-association only)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from framework import peft, quant
from framework.models import lm

VARIANTS = {
    "lora": peft.LoraConfig(rank=4, alpha=8.0),
    "rslora": peft.LoraConfig(rank=4, alpha=8.0, scaling="rslora"),
    "dora": peft.LoraConfig(rank=4, alpha=8.0, dora=True),
    "pissa": peft.LoraConfig(rank=4, alpha=8.0, init="pissa"),
    "qlora": peft.LoraConfig(rank=4, alpha=8.0, base_format="nf4", double_quant=True),
}
TOL = 2e-5


@pytest.fixture(scope="module")
def tiny():
    cfg = lm.LMConfig.from_config(common.model_config("tiny"))
    params = lm.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 3, cfg.vocab_size)
    return cfg, params, tokens, jax.jit(lm.apply, static_argnums=2)


def _perturb(adapters, seed=0):
    """Adapters as if trained: every leaf moved by a random amount (B no longer zero)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_scales():
    assert VARIANTS["lora"].scale == 2.0 and VARIANTS["rslora"].scale == 4.0
    with pytest.raises(ValueError, match="scaling must be"):
        peft.LoraConfig(scaling="bad")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        peft.LoraConfig(rank=0)


@pytest.mark.parametrize("name", ["lora", "dora", "pissa"])
def test_init_leaves_the_model_unchanged(tiny, name):
    """B = 0 (LoRA), m = ||W|| (DoRA) and residual + principal part (PiSSA) all start at the base model's logits."""
    cfg, params, tokens, apply = tiny
    adapted = peft.add_adapters(params, VARIANTS[name], jax.random.key(2), model_cfg=cfg)
    np.testing.assert_allclose(apply(adapted, tokens, cfg), apply(params, tokens, cfg), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merge_matches_adapted_model(tiny, name):
    cfg, params, tokens, apply = tiny
    adapted = peft.add_adapters(params, VARIANTS[name], jax.random.key(3), model_cfg=cfg)
    adapted = peft.set_adapters(adapted, _perturb(peft.adapter_params(adapted)))
    merged = peft.merge(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    logits = apply(adapted, tokens, cfg)
    assert float(jnp.max(jnp.abs(logits - apply(params, tokens, cfg)))) > 1e-3  # the adapters do something
    np.testing.assert_allclose(apply(merged, tokens, cfg), logits, atol=TOL, rtol=0)


def test_unmerge_recovers_base(tiny):
    cfg, params, _, _ = tiny
    adapted = peft.add_adapters(params, VARIANTS["lora"], jax.random.key(4), model_cfg=cfg)
    adapted = peft.set_adapters(adapted, _perturb(peft.adapter_params(adapted)))
    back = peft.unmerge(peft.merge(adapted), adapted)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapted)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    dora = peft.add_adapters(params, VARIANTS["dora"], jax.random.key(4), model_cfg=cfg)
    with pytest.raises(ValueError, match="DoRA/QLoRA merges are one-way"):
        peft.unmerge(peft.merge(dora), dora)


def test_targets_and_trainable_subset(tiny):
    cfg, params, _, _ = tiny
    lcfg = peft.LoraConfig(rank=2, targets=r"layers/attn/(q_proj|v_proj)/kernel")
    adapted = peft.add_adapters(params, lcfg, jax.random.key(5), model_cfg=cfg)
    ad = peft.adapter_params(adapted)
    assert set(ad) == {"layers"} and set(ad["layers"]) == {"attn"} and set(ad["layers"]["attn"]) == {"q_proj", "v_proj"}
    L, D = cfg.n_layers, cfg.d_model
    expected = L * ((D * 2 + 2 * cfg.n_heads * cfg.head_dim) + (D * 2 + 2 * cfg.n_kv_heads * cfg.head_dim))
    assert peft.count_params(ad) == expected
    with pytest.raises(ValueError, match="no Linear kernel matches"):
        peft.add_adapters(params, peft.LoraConfig(targets="embed"), jax.random.key(5), model_cfg=cfg)
    with pytest.raises(ValueError, match="exceeds"):
        peft.add_adapters(params, peft.LoraConfig(rank=100), jax.random.key(5), model_cfg=cfg)


def test_qlora_base_is_nf4(tiny):
    cfg, params, _, _ = tiny
    adapted = peft.add_adapters(params, VARIANTS["qlora"], jax.random.key(6), model_cfg=cfg)
    w = adapted["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(w.base, quant.QuantizedWeight) and w.base.fmt == "nf4" and w.base.scale_scales is not None


def test_only_adapters_train_and_checkpoint(tiny, tmp_path):
    """Gradients flow to A/B only; a few Adam steps lower a toy loss; the checkpoint holds exactly the adapters."""
    cfg, params, tokens, _ = tiny
    adapted = peft.add_adapters(params, VARIANTS["lora"], jax.random.key(7), model_cfg=cfg)
    ad = peft.adapter_params(adapted)
    opt = optax.adam(1e-2)
    state = opt.init(ad)

    def loss_fn(ad):
        logits = lm.apply(peft.set_adapters(adapted, ad), tokens[:, :-1], cfg)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(ad, state):
        loss, g = jax.value_and_grad(loss_fn)(ad)
        upd, state = opt.update(g, state, ad)
        return optax.apply_updates(ad, upd), state, loss

    losses = []
    for _ in range(5):
        ad, state, loss = step(ad, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    trained = peft.set_adapters(adapted, ad)
    # the frozen base is bit-identical
    np.testing.assert_array_equal(
        trained["layers"]["attn"]["q_proj"]["kernel"].base, params["layers"]["attn"]["q_proj"]["kernel"]
    )
    peft.save_adapters(tmp_path / "ad", ad)
    restored = peft.load_adapters(tmp_path / "ad", ad)
    assert peft.count_params(restored) == peft.count_params(ad) < 0.2 * peft.count_params(params)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(x, y)


def test_lora_plus_gives_b_a_larger_step(tiny):
    cfg, params, _, _ = tiny
    adapted = peft.add_adapters(params, VARIANTS["dora"], jax.random.key(8), model_cfg=cfg)
    ad = peft.adapter_params(adapted)
    opt = peft.lora_plus(1e-3, ratio=16.0)
    state = opt.init(ad)
    ones = jax.tree.map(jnp.ones_like, ad)
    upd, _ = opt.update(ones, state, ad)
    # Adam's first step on a constant gradient moves every weight by ~lr: 1e-3 for A and m, 16e-3 for B.
    q = upd["layers"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(q["a"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(q["m"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(q["b"], -16e-3, rtol=1e-4)


@pytest.fixture(scope="module")
def lm_task():
    """A tiny train_lm task (the quickstart's model and task format, batches of 8) with its config."""
    import dataclasses

    from configs import quickstart
    from experiments import train_lm

    config = quickstart.get_config()
    config.unlock()
    config.train.update(steps=4, batch_size=8, log_every=1, checkpoint_every=4, eval_every=0, stop_when="")
    config.train.update(progress=False, async_checkpoint=False)
    model_cfg, task = train_lm.make_task(config)
    return config, model_cfg, dataclasses.replace(task, eval_fn=None)


def test_adapter_task_trains_the_adapters_on_the_loop(lm_task, tmp_path):
    """peft.adapter_task on loop.train equals a hand-written adapter loop step for step (same batches, LoRA+), keeps
    the base out of the checkpoint, logs every step's loss, and a rerun restores instead of training."""
    from framework.training import loop
    from framework.training.metrics import read_metrics

    config, model_cfg, task = lm_task
    base = lm.init(model_cfg, jax.random.key(0))
    adapted = peft.add_adapters(base, peft.LoraConfig(rank=2, alpha=4.0), jax.random.key(1), model_cfg=model_cfg)
    schedule = optax.linear_schedule(0.0, 1e-2, 2)
    tx = peft.lora_plus(schedule, 16.0)
    devices = jax.devices()[:1]  # the reference below runs on one device too
    state = loop.train(config, str(tmp_path), peft.adapter_task(task, adapted, optimizer=tx, lr_schedule=schedule),
                       devices=devices)  # fmt: skip

    ad = peft.adapter_params(adapted)
    opt_state, losses = tx.init(ad), []

    @jax.jit
    def step(ad, opt_state, batch):
        grad_fn = jax.value_and_grad(lambda a: task.loss_fn(peft.set_adapters(adapted, a), batch), has_aux=True)
        (loss, _), g = grad_fn(ad)
        upd, opt_state = tx.update(g, opt_state, ad)
        return optax.apply_updates(ad, upd), opt_state, loss

    for _, batch in zip(range(4), task.batches(0)):
        ad, opt_state, loss = step(ad, opt_state, batch)
        losses.append(float(loss))
    # Equal up to float rounding: the loop's finiteness guard on the update changes how XLA fuses it (last bits).
    assert jax.tree.structure(state.params) == jax.tree.structure(ad)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ad)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)
    assert float(jnp.max(jnp.abs(state.params["layers"]["mlp"]["up_proj"]["kernel"]["b"]))) > 0  # B left zero
    records = read_metrics(str(tmp_path))
    np.testing.assert_allclose([r["train/loss"] for r in records], losses, rtol=TOL)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["train/lr"] == pytest.approx(1e-2)
    # The checkpoint holds the adapters and their optimiser state, not the base: rerunning restores it.
    again = loop.train(config, str(tmp_path), peft.adapter_task(task, adapted, optimizer=tx, lr_schedule=schedule),
                       devices=devices)  # fmt: skip
    assert int(again.step) == 4 and read_metrics(str(tmp_path)) == records
    for x, y in zip(jax.tree.leaves(again.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert peft.count_params(again.params) == peft.count_params(ad) < 0.2 * peft.count_params(base)


def test_adapter_task_refuses_a_task_with_frozen_inputs(lm_task):
    import dataclasses

    _, model_cfg, task = lm_task
    adapted = peft.add_adapters(lm.init(model_cfg, jax.random.key(0)), VARIANTS["lora"], jax.random.key(1),
                                model_cfg=model_cfg)  # fmt: skip
    with pytest.raises(ValueError, match="already has frozen inputs"):
        peft.adapter_task(dataclasses.replace(task, frozen={"x": jnp.zeros(2)}), adapted)
