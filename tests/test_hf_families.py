"""HF import beyond Llama (Qwen2, Mistral, Gemma, Gemma-2), export (`save_hf_checkpoint`) and tokenizer loading.

Logit and greedy-token parity for every golden family lives in tests/test_hf.py (GOLDEN_CASES); this file checks
that the goldens exercise each feature, windowed/softcapped decoding over every cache layout, the exact export
round trip, the unsupported-architecture error and `load_hf_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hf_golden import ASSETS, PARITY_ATOL, load, max_logit_diff
from hf_golden import CASES as ALL_CASES
from hf_golden import golden as load_golden

from framework import inference
from framework.models import hf, lm


def test_config_mapping_per_family():
    qwen, _ = load("qwen2_bias")
    assert qwen.qkv_bias and qwen.sliding_window is None and qwen.rope_theta == 1e6 and not qwen.tie_embeddings
    mistral, _ = load("mistral_window")
    assert mistral.layer_windows == (5, 5) and not mistral.qkv_bias
    gemma, _ = load("gemma_geglu")
    assert (gemma.head_dim, gemma.n_kv_heads, gemma.mlp_activation) == (24, 1, "gelu_tanh")
    assert gemma.norm_plus_one and gemma.scale_embeddings and gemma.tie_embeddings and not gemma.post_norms
    g2, _ = load("gemma2_softcap")
    assert g2.layer_windows == (6, None, 6) and g2.sliding_window_layers == (0, 2)
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar) == (5.0, 8.0, 24.0)
    assert g2.post_norms and g2.sm_scale == 24.0**-0.5


def test_family_config_defaults():
    """Fields a config.json may leave out: Gemma ties by default, Gemma-2 alternates from layer 0, Qwen2's
    use_sliding_window/max_window_layers pick the windowed layers."""
    base = dict(vocab_size=32, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=24)
    g2 = hf.hf_config_to_lm_config({**base, "model_type": "gemma2", "sliding_window": 8})
    assert g2.layer_windows == (8, None, 8, None) and g2.tie_embeddings and g2.attn_logit_softcap == 50.0
    gemma = hf.hf_config_to_lm_config({**base, "model_type": "gemma", "head_dim": 12})
    assert gemma.tie_embeddings and gemma.head_dim == 12 and gemma.sliding_window is None
    legacy = hf.hf_config_to_lm_config({**base, "model_type": "gemma", "hidden_act": "gelu"})
    assert legacy.mlp_activation == "gelu_tanh"  # as transformers: the official releases' "gelu" means tanh
    qwen = dict(base, model_type="qwen2", sliding_window=4, max_window_layers=2)
    assert hf.hf_config_to_lm_config(qwen).sliding_window is None  # use_sliding_window defaults to False
    assert hf.hf_config_to_lm_config({**qwen, "use_sliding_window": True}).layer_windows == (None, None, 4, 4)
    mistral = hf.hf_config_to_lm_config({**base, "model_type": "mistral", "sliding_window": None})
    assert mistral.sliding_window is None
    with pytest.raises(ValueError, match="layer_types"):
        hf.hf_config_to_lm_config({**base, "model_type": "gemma2", "layer_types": ["chunked_attention"] * 4})
    with pytest.raises(ValueError, match="hidden_activation='relu'"):
        hf.hf_config_to_lm_config({**base, "model_type": "gemma2", "hidden_activation": "relu"})


@pytest.mark.parametrize(
    "case, change",
    [
        ("mistral_window", dict(sliding_window=None)),
        ("gemma2_softcap", dict(sliding_window=None, sliding_window_layers=None)),
        ("gemma2_softcap", dict(attn_logit_softcap=None)),
        ("gemma2_softcap", dict(final_logit_softcap=None)),
        ("gemma2_softcap", dict(query_pre_attn_scalar=None)),
        ("gemma_geglu", dict(scale_embeddings=False)),
        ("gemma_geglu", dict(mlp_activation="gelu")),
    ],
)
def test_goldens_exercise_each_feature(case, change):
    """Switching a feature off moves the logits well past the parity tolerance: the goldens really test it."""
    cfg, params = load(case)
    assert max_logit_diff(case, dataclasses.replace(cfg, **change), params) > 10 * PARITY_ATOL


def test_flash_kernel_training_path_parity():
    """Cache-free forward through the Pallas flash kernel (interpret mode): window, softcap and the score scale
    reach the kernel, the local/global choice made by lax.switch under the layer scan."""
    cfg, params = load("gemma2_softcap")
    assert max_logit_diff("gemma2_softcap", dataclasses.replace(cfg, attention_impl="interpret"), params) <= PARITY_ATOL


def test_embedding_scale_is_rounded_to_the_weights_dtype():
    """HF Gemma multiplies by sqrt(d_model) cast to the weights' dtype: bf16(sqrt(48)) = 6.9375, not 6.9282."""
    cfg = lm.LMConfig(
        vocab_size=16, d_model=48, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32, scale_embeddings=True
    )
    # fp32 activations from bf16 weights: the scale still follows the weights (rounding it to the activations'
    # dtype would leave 6.9282 here).
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", dtype="float32")
    table = np.random.default_rng(0).normal(size=(16, 48)).astype(ml_dtypes.bfloat16)
    tokens = np.arange(4, dtype=np.int32)[None]
    got = lm.Embed(cfg).apply({"params": {"embedding": table}}, tokens)
    scale = float(np.float32(48**0.5).astype(ml_dtypes.bfloat16))
    assert scale == 6.9375
    want = table[tokens].astype(np.float32) * np.float32(scale)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("case", ["mistral_window", "gemma2_softcap"])
def test_windowed_decode_paged_kernel_matches_transformers(case):
    """Greedy tokens equal HF `generate` with a paged cache: the prompt goes through the paged reference path,
    every new token through the decode kernel (interpret mode) with window and softcap. (test_hf.py covers the
    dense cache with the reference attention.)"""
    cfg, params = load(case)
    golden = load_golden(case)
    cfg = dataclasses.replace(cfg, attention_impl="interpret")
    out = inference.generate(
        params, cfg, golden["input_ids"][:, :8], max_new_tokens=12, stop_tokens=(), kv_layout="paged", page_size=4
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), golden["greedy_tokens"])


def test_stacked_cache_forward_with_alternating_windows():
    """Under the layer scan (traced layer index) local/global layers pick their window by lax.switch; chunked
    prefill + decode over a stacked cache equals one full forward pass."""
    cfg, params = load("gemma2_softcap")
    golden = load_golden("gemma2_softcap")
    tokens = golden["input_ids"]
    cache = inference.kv_cache.init_cache(cfg, tokens.shape[0], 32)
    first = lm.forward(params, tokens[:, :9], cfg, kv_cache=cache)
    pos = np.broadcast_to(np.arange(9, 17, dtype=np.int32), (2, 8))
    second = lm.forward(params, tokens[:, 9:], cfg, positions_BT=pos, kv_cache=first.kv_cache)
    logits = np.concatenate([np.asarray(first.logits), np.asarray(second.logits)], axis=1)
    assert float(np.abs(logits - golden["logits"]).max()) <= PARITY_ATOL


@pytest.mark.parametrize("case", ALL_CASES)
def test_save_round_trip_is_exact(case, tmp_path):
    """load(save(x)) is bitwise x, same config; the written tensors are bitwise the transformers-written ones."""
    cfg, params = load(case)
    out = hf.save_hf_checkpoint(params, cfg, tmp_path / case)
    cfg2, params2 = hf.load_hf_checkpoint(out)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    mine = safetensors.numpy.load_file(str(out / hf.SINGLE_FILE))
    theirs = {}
    for file in sorted((ASSETS / case).glob("model*.safetensors")):
        theirs.update(safetensors.numpy.load_file(str(file)))
    assert sorted(mine) == sorted(theirs)
    for name, x in theirs.items():
        np.testing.assert_array_equal(mine[name], x, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((ASSETS / case / "config.json").read_text())["architectures"]


def test_save_bf16_sharded_and_unstacked(tmp_path):
    cfg, params = load("gemma2_softcap")
    bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
    out = hf.save_hf_checkpoint(lm.unstack_layers(bf16, cfg), cfg, tmp_path / "bf16", max_shard_bytes=60_000)
    assert (out / hf.INDEX_FILE).exists() and len(list(out.glob("model-*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    cfg2, params2 = hf.load_hf_checkpoint(out, param_dtype="bfloat16")
    assert cfg2 == dataclasses.replace(cfg, param_dtype="bfloat16")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), bf16, params2)


def test_save_reports_what_a_family_cannot_hold(tmp_path):
    cfg, params = load("llama_gqa")
    with pytest.raises(ValueError, match=r"model_type='llama' cannot express model\.final_logit_softcap=30\.0"):
        hf.save_hf_checkpoint(params, dataclasses.replace(cfg, final_logit_softcap=30.0), tmp_path / "a")
    g2, g2_params = load("gemma2_softcap")
    with pytest.raises(ValueError, match=r"cannot express .*model\.post_norms=True"):
        hf.save_hf_checkpoint(g2_params, g2, tmp_path / "b", model_type="gemma")
    gemma, gemma_params = load("gemma_geglu")
    with pytest.raises(ValueError, match=r"model_type='gemma' cannot express model\.mlp_activation='gelu'"):
        hf.save_hf_checkpoint(gemma_params, dataclasses.replace(gemma, mlp_activation="gelu"), tmp_path / "d")

    class FakeQuantized:
        shape = (2, 64, 4, 16)

        def matmul(self, x, dtype):
            return x

    bad = jax.tree.map(lambda x: x, params)
    bad["layers"]["attn"]["q_proj"]["kernel"] = FakeQuantized()
    bad["layers"]["attn"]["q_proj"]["bias"] = np.zeros((2, 4, 16), np.float32)
    with pytest.raises(ValueError) as err:
        hf.save_hf_checkpoint(bad, cfg, tmp_path / "c")
    msg = str(err.value)
    assert "layers/attn/q_proj/kernel is a FakeQuantized: merge adapters / dequantise" in msg
    assert "1 unexpected param(s) for model_type='llama': ['layers/attn/q_proj/bias']" in msg
    assert not (tmp_path / "c").exists()


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path):
    base = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    with pytest.raises(ValueError) as err:
        hf.hf_config_to_lm_config({**base, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})
    msg = str(err.value)
    assert "Phi3ForCausalLM" in msg and "model_type='phi3'" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM"):
        assert arch in msg
    assert hf.supported_architectures() == sorted(
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM"]
    )


def test_load_hf_tokenizer(tmp_path):
    cfg, _ = load("llama_gqa")
    tok = hf.load_hf_tokenizer(ASSETS / "llama_gqa", vocab_size=cfg.vocab_size)
    text = "Q 12+34\nA 46\n"
    ids = tok.encode(text).ids
    assert ids and max(ids) < cfg.vocab_size and tok.decode(ids).replace(" ", "") == text.replace(" ", "")
    assert tok.token_to_id("<pad>") == cfg.pad_id and tok.token_to_id("<s>") == cfg.bos_id
    with pytest.raises(ValueError, match="more than the model's vocab_size=4"):
        hf.load_hf_tokenizer(ASSETS / "llama_gqa", vocab_size=4)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*config.json"):
        hf.load_hf_tokenizer(ASSETS / "llama_tied")
    _, params = load("llama_gqa")
    out = hf.save_hf_checkpoint(params, cfg, tmp_path / "with_tok", tokenizer=tok)
    assert hf.load_hf_tokenizer(out).encode(text).ids == ids


_LIVE_FAMILIES = {
    "qwen2": dict(num_key_value_heads=2, num_hidden_layers=2, vocab_size=50),
    "mistral": dict(num_key_value_heads=2, sliding_window=3, head_dim=8),
    "gemma": dict(num_key_value_heads=2, head_dim=8, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=4.0,
        final_logit_softcapping=6.0,
        query_pre_attn_scalar=12,
    ),
}


@pytest.mark.parity
@pytest.mark.parametrize("family", sorted(_LIVE_FAMILIES))
def test_live_transformers_parity_and_export(tmp_path, family):
    """Fresh transformers models of each family load with parity, and Lumen's export loads back in transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    script = pathlib.Path(__file__).parents[1] / "scripts" / "golden" / "hf_goldens.py"
    spec = importlib.util.spec_from_file_location("hf_goldens", script)
    goldens = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(goldens)
    model = goldens.build_model(_LIVE_FAMILIES[family], seed=99, family=family)
    goldens.save_checkpoint(model, tmp_path / "hf", {})
    input_ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(input_ids=input_ids).logits.float().numpy()
    cfg, params = hf.load_hf_checkpoint(tmp_path / "hf")
    got = np.asarray(lm.apply(params, input_ids.numpy().astype(np.int32), cfg), np.float32)
    assert float(np.abs(got - want).max()) <= PARITY_ATOL
    hf.save_hf_checkpoint(params, cfg, tmp_path / "lumen")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "lumen"), attn_implementation="eager")
    with torch.no_grad():
        again = back.eval()(input_ids=input_ids).logits.float().numpy()
    assert float(np.abs(again - want).max()) <= PARITY_ATOL
