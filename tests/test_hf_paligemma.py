"""PaliGemma import (framework.models.hf_paligemma) against a tiny random `PaliGemmaForConditionalGeneration` made by
real transformers (scripts/golden/paligemma_goldens.py; fixtures in tests/assets/paligemma): fp32 logits within 1e-4
for a batch of images + prompts (one row with a causal answer suffix), the same greedy generation through the KV
cache, checkpoint-name spellings, and the missing / unexpected / mis-shaped tensor errors.

Glossary: B batch, T tokens, V vocab.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open

from framework.models import hf, hf_paligemma, vlm

ASSETS = pathlib.Path(__file__).parent / "assets" / "paligemma"
ATOL = 1e-4  # fp32 logits vs transformers (the bound)


@pytest.fixture(scope="module")
def loaded():
    cfg, params = hf_paligemma.load_paligemma_checkpoint(ASSETS)
    return cfg, params, dict(np.load(ASSETS / "golden.npz"))


def test_config_is_siglip_linear_gemma(loaded):
    cfg, _, g = loaded
    assert cfg.projector == "linear" and cfg.prefix_lm and cfg.image_token_id == 100
    assert cfg.vision.num_patches == 4 and cfg.lm.scale_embeddings and cfg.lm.tokenizer == "hf"
    assert int((g["input_ids"] == cfg.image_token_id).sum(1)[0]) == cfg.num_image_tokens


def test_logits_match_transformers(loaded):
    cfg, params, g = loaded
    ids, types = g["input_ids"], g["token_type_ids"]
    prefix = (types == 0).sum(1).astype(np.int32)  # token type 0 = the bidirectional prefix, 1 = the causal suffix
    assert prefix.tolist() == [ids.shape[1], ids.shape[1] - 3, ids.shape[1]]
    vlm.check_inputs(g["pixel_values"], ids, cfg)  # what apply checks eagerly; under jit one program runs it all
    run = jax.jit(lambda p, im, t, pre: vlm.apply(p, im, t, cfg, prefix_len_B=pre))
    logits = np.asarray(run(params, g["pixel_values"], ids, prefix))
    assert np.abs(g["logits"]).max() > 1.0  # the fixture's logits spread: a wrong mapping cannot hide under 1e-4
    np.testing.assert_allclose(logits, g["logits"], atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(loaded):
    cfg, params, g = loaded
    out = vlm.generate(
        params, cfg, g["pixel_values"], list(g["input_ids"]), max_new_tokens=g["greedy_tokens"].shape[1], stop_tokens=()
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), g["greedy_tokens"])
    assert len({tuple(r) for r in g["greedy_tokens"].tolist()}) == 3  # three different continuations


def _tensors():
    with safe_open(str(ASSETS / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write(folder, tensors):
    folder.mkdir()
    shutil.copy(ASSETS / "config.json", folder / "config.json")
    hf._write_safetensors(folder / "model.safetensors", tensors)
    return folder


def test_other_name_spellings_load_the_same(loaded, tmp_path):
    """transformers >= 4.52 writes `model.vision_tower.` / `model.language_model.`; the hub has `vision_model.`."""
    _, params, _ = loaded
    renamed = {}
    for k, v in _tensors().items():
        k = k.replace("vision_tower.", "vision_tower.vision_model.") if k.startswith("vision_tower.") else k
        renamed[k.replace("language_model.model.", "model.language_model.")] = v
    _, again = hf_paligemma.load_paligemma_checkpoint(_write(tmp_path / "ck", renamed))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_unexpected_misshaped_tensors_are_named_together(tmp_path):
    t = _tensors()
    del t["vision_tower.encoder.layers.1.mlp.fc2.bias"]
    t["multi_modal_projector.linear.bias"] = np.zeros(7, np.float32)
    t["vision_tower.head.probe"] = np.zeros((1, 1, 32), np.float32)
    with pytest.raises(ValueError) as e:
        hf_paligemma.load_paligemma_checkpoint(_write(tmp_path / "bad", t))
    msg = str(e.value)
    assert "1 missing vision tensor(s):\n    vision_tower.encoder.layers.1.mlp.fc2.bias" in msg
    assert "1 mis-shaped projector tensor(s):\n    multi_modal_projector.linear.bias: shape [7], expected [48]" in msg
    assert "1 unexpected tensor(s):\n    vision_tower.head.probe" in msg


def test_unsupported_config_fields_are_named(tmp_path):
    config = json.loads((ASSETS / "config.json").read_text())
    config["vision_config"]["vision_use_head"] = True
    with pytest.raises(ValueError, match="vision_config.vision_use_head=True"):
        hf_paligemma.paligemma_config(config)
    with pytest.raises(ValueError, match="not a PaliGemma checkpoint: model_type='gemma'"):
        hf_paligemma.paligemma_config(config["text_config"])
