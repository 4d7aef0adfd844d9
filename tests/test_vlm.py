"""The VLM (framework.models.vlm): prefix-LM mask, placeholder merge, text-only parity with the LM, generation of a
batch mixing image and text-only rows (KV cache vs the no-cache reference), frozen groups and a LoRA stage through
the one loop, and bad inputs refused before anything compiles.

Glossary: B batch, T tokens, N image tokens per image (2x4 = 8 patches here), D LM width.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from experiments import vlm as vlm_exp
from framework import inference
from framework.models import attention as attn_lib
from framework.models import lm, vlm
from framework.peft import lora
from framework.training import loop

IMG = 100  # the placeholder id (the first id after the printable-text tokenizer's)
VISION = dict(image_height=16, image_width=32, patch_size=8, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def _cfg(**kw):
    lm_cfg = lm.LMConfig(
        vocab_size=104, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64,
        tokenizer="text", scan_layers=False,
    )  # fmt: skip
    return vlm.VLMConfig(vision=VISION, lm=lm_cfg, image_token_id=IMG, **kw)


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    # x3 sharpens the random model so that every change of input shows in the logits and greedy paths differ.
    params = jax.jit(lambda k: jax.tree.map(lambda x: 3.0 * x, vlm.init(cfg, k)))(jax.random.key(0))
    images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 32, 1)).astype(np.float32)
    return cfg, params, images


def _prompt(cfg, ids, with_image):
    return vlm.prompt_tokens(cfg, np.asarray(ids, np.int32), with_image=with_image)


def test_prefix_mask_matches_a_hand_built_one(model):
    """Which outputs move when one input embedding moves is exactly a hand-built prefix-LM mask (and causal without)."""
    cfg, params, images = model
    N, T = cfg.num_image_tokens, cfg.num_image_tokens + 6
    tokens = np.stack([np.pad(_prompt(cfg, [10, 11, 12], True), (0, 2), constant_values=20)] * 2)
    prefix = np.array([N + 4, 0], np.int32)  # row 0: image + BOS + 3 prompt tokens; row 1: causal
    hand = np.zeros((2, T, T), bool)
    for b in range(2):
        for q in range(T):
            for s in range(T):
                hand[b, q, s] = s <= q or (q < prefix[b] and s < prefix[b])
    pos = np.broadcast_to(np.arange(T), (2, T))
    np.testing.assert_array_equal(attn_lib.make_mask(pos, pos, prefix_len_B=jnp.asarray(prefix)), hand)

    embeds = vlm.embed_inputs(params, images[:2], tokens, cfg)
    # Position s is a traced argument: one compiled program serves the base run and every moved input.
    run = jax.jit(
        lambda e, s, d: lm.forward(params["lm"], None, cfg.lm, embeds_BTD=e.at[:, s].add(d), prefix_len_B=prefix).logits
    )
    base = np.asarray(run(embeds, 0, 0.0))
    moved = np.zeros((2, T, T), bool)
    for s in range(T):
        diff = np.abs(np.asarray(run(embeds, s, 1.0)) - base).max(-1)
        moved[:, :, s] = diff > 1e-6
    np.testing.assert_array_equal(moved, hand)


def test_image_embeddings_land_exactly_at_placeholders(model):
    cfg, params, images = model
    N = cfg.num_image_tokens
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 99, (3, N + 7)).astype(np.int32)
    where = [np.sort(rng.choice(N + 7, N, replace=False)), np.arange(2, 2 + N)]  # scattered, then contiguous
    for b, w in enumerate(where):
        tokens[b, w] = IMG  # row 2 stays text-only
    vlm.check_inputs(images, tokens, cfg)
    # One program computes both, so the image tokens compared are the very values merged (one rounding).
    both = jax.jit(lambda p, i, t: (vlm._embed(p, i, t, cfg), vlm.encode_images(p, i, cfg)))
    embeds, image_tokens = map(np.asarray, both(params, jnp.asarray(images), jnp.asarray(tokens)))
    text = np.asarray(lm.embed(params["lm"], tokens, cfg.lm))
    for b in range(3):
        is_img = tokens[b] == IMG
        np.testing.assert_array_equal(embeds[b, is_img], image_tokens[b, : int(is_img.sum())])
        np.testing.assert_array_equal(embeds[b, ~is_img], text[b, ~is_img])
    assert not np.array_equal(image_tokens[0], image_tokens[1])


def test_placeholder_count_mismatch_names_both_counts(model):
    cfg, params, images = model
    tokens = np.full((2, 12), 20, np.int32)
    tokens[1, :3] = IMG
    with pytest.raises(ValueError, match=r"row 1 has 3 image placeholder tokens .* gives 8 image tokens"):
        vlm.apply(params, images[:2], tokens, cfg)
    tokens[1, :3] = 20
    tokens[0, :8] = IMG
    with pytest.raises(ValueError, match=r"row 0 has 8 image placeholder tokens .* no images were given"):
        vlm.apply(params, None, tokens, cfg)


def test_text_only_prompt_gives_the_plain_lm_logits(model):
    cfg, params, images = model
    tokens = np.random.default_rng(2).integers(3, 99, (2, 11)).astype(np.int32)
    want = np.asarray(jax.jit(lambda p, t: lm.apply(p, t, cfg.lm))(params["lm"], tokens))
    run = jax.jit(lambda p, i, t: vlm.apply(p, i, t, cfg))
    np.testing.assert_array_equal(np.asarray(run(params, None, tokens)), want)
    np.testing.assert_array_equal(np.asarray(run(params, jnp.asarray(images[:2]), tokens)), want)


def test_mixed_batch_generates_with_the_cache_as_the_reference(model):
    """Image rows and a text-only row in one batch: cached == no-cache reference (tokens exactly, log-probs 1e-5);
    the text-only row is the plain LM's generation, and the two image rows continue differently."""
    cfg, params, images = model
    prompts = [_prompt(cfg, [40, 41, 42], True), _prompt(cfg, [40, 41, 42, 43, 44], False), _prompt(cfg, [50], True)]
    imgs = [images[0], None, images[2]]
    kw = dict(max_new_tokens=6, stop_tokens=())
    fast = vlm.generate(params, cfg, imgs, prompts, **kw)
    slow = vlm.generate(params, cfg, imgs, prompts, use_cache=False, **kw)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, atol=1e-5)
    plain = inference.generate(params["lm"], cfg.lm, [prompts[1]], prefix_len=[prompts[1].size], **kw)
    np.testing.assert_array_equal(fast.tokens[1], plain.tokens[0])
    assert not np.array_equal(fast.tokens[0], fast.tokens[2])  # the image changes the continuation


def _train_config(tmp_path, steps=3):
    config = common.lm_experiment(size="tiny")
    config.mesh = common.mesh_config(data=1)
    config.train.update(dict(steps=steps, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, checkpoint_every=100))
    config.train.progress = False
    return config


def _batch(cfg):
    rng = np.random.default_rng(3)
    tokens = np.stack([_prompt(cfg, rng.integers(3, 99, 6), True) for _ in range(8)])
    return {
        "images": rng.uniform(-1, 1, (8, 16, 32, 1)).astype(np.float32),
        "tokens": tokens,
        "loss_mask": (np.arange(tokens.shape[1]) >= cfg.num_image_tokens + 4).astype(np.float32)[None].repeat(8, 0),
        "prefix_len": np.full(8, cfg.num_image_tokens + 4, np.int32),
    }


def test_lora_stage_trains_adapters_and_keeps_frozen_groups_bitwise(model, tmp_path):
    """Stage 2 with the LM through LoRA and the encoder frozen by its label: the encoder stays bitwise, the projector
    trains, and after merging only the LM's LoRA-targeted kernels differ from the start (the rest bitwise equal)."""
    cfg, params, _ = model
    batch = _batch(cfg)
    task, finish = vlm_exp.lora_task(
        cfg, params, rank=2, trained=("projector", "lm"), batches=lambda start: iter([batch] * 10)
    )
    state = loop.train(_train_config(tmp_path), str(tmp_path / "run"), task, devices=jax.devices()[:1])
    assert set(state.params) == {"vision", "projector", "lora"}
    out = finish(jax.device_get(state.params))
    for g, frozen in (("vision", True), ("projector", False)):
        same = [np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, (out[g], params[g])))]
        assert all(same) if frozen else not any(same), g
    target = re.compile(lora.DEFAULT_TARGETS)
    flat = jax.tree_util.tree_flatten_with_path(out["lm"])[0]
    for (path, new), old in zip(flat, jax.tree.leaves(params["lm"])):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        assert new.shape == old.shape and (np.array_equal(new, old) != bool(target.fullmatch(name))), name


@pytest.mark.slow  # the fast LoRA-stage test above checks a label-frozen group stays bitwise
@pytest.mark.parametrize("frozen", [("vision", "lm"), ("vision",)])
def test_frozen_groups_stay_bitwise_unchanged(model, tmp_path, frozen):
    cfg, params, images = model
    batch = _batch(cfg)
    task = loop.Task(
        init_params=lambda r: params,
        logical_axes=vlm.logical_axes(cfg),
        loss_fn=vlm.loss_fn(cfg),
        batches=lambda start: iter([batch] * 10),
        param_labels=vlm.param_groups,
        label_settings={g: None for g in frozen},
    )
    # One device: the property is the optimiser's, and a one-device step compiles in a fraction of the 8-way one.
    state = loop.train(_train_config(tmp_path), str(tmp_path / "run"), task, devices=jax.devices()[:1])
    for g in vlm.GROUPS:
        same = [
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(*map(jax.tree.leaves, (state.params[g], params[g])))
        ]
        if g in frozen:
            assert all(same), g
        else:
            assert not any(same), g


BAD_IMAGES = [
    (np.zeros((16, 32, 1), np.float32), r"rank 4 .* got shape \(16, 32, 1\)"),
    (np.zeros((1, 16, 32, 3), np.float32), r"3 channels .* expected vision.channels=1"),
    (np.zeros((1, 16, 30, 1), np.float32), r"16x30 .* not a multiple of vision.patch_size=8"),
    (np.zeros((1, 24, 32, 1), np.float32), r"image size 24x32 .* expected 16x32"),
    (np.zeros((1, 16, 32, 1), np.uint8), r"dtype uint8, expected floating point"),
    (np.full((1, 16, 32, 1), 2.0, np.float32), r"pixel \(0, 0, 0, 0\) = 2.0 is outside \[-1.0, 1.0\]"),
    (np.full((1, 16, 32, 1), np.nan, np.float32), r"= nan is outside"),
]


@pytest.mark.parametrize("image,match", BAD_IMAGES, ids=["rank", "channels", "patch", "size", "dtype", "range", "nan"])
def test_bad_images_error_before_compiling(model, image, match):
    cfg, params, _ = model
    cfg = dataclasses.replace(cfg, prefix_lm=False)  # a config nothing has compiled for yet
    before = vlm._embed_jit._cache_size()
    prompt = _prompt(cfg, [40], True)
    rows = image.shape[0] if image.ndim == 4 else 1
    with pytest.raises(ValueError, match=match):
        vlm.generate(params, cfg, image, [prompt] * rows, max_new_tokens=2)
    with pytest.raises(ValueError, match=match):
        vlm.apply(params, image, np.stack([prompt] * rows), cfg)
    assert vlm._embed_jit._cache_size() == before
