"""HF checkpoint import: fp32 logit parity with real `transformers` goldens, layout, and error reporting.

Goldens in tests/assets/hf/ come from `scripts/golden/hf_goldens.py` (real transformers + torch); this file needs
neither, except the `parity`-marked live test, which builds a fresh transformers model when torch is installed.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hf_golden import ASSETS, PARITY_ATOL, max_logit_diff
from hf_golden import CASES as GOLDEN_CASES

from framework import inference
from framework.models import hf, lm


def _copy_case(case: str, dst: pathlib.Path) -> pathlib.Path:
    out = dst / case
    shutil.copytree(ASSETS / case, out)
    return out


def _edit_config(folder: pathlib.Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_logit_parity(case):
    cfg, params = hf.load_hf_checkpoint(ASSETS / case)
    diff = max_logit_diff(case, cfg, params)
    assert diff <= PARITY_ATOL, f"{case}: max |logits - transformers| = {diff:.3g} > {PARITY_ATOL}"


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_generate_matches_transformers_greedy(case):
    """`generate` works on any imported checkpoint: greedy tokens equal HF `generate`'s, token for token."""
    cfg, params = hf.load_hf_checkpoint(ASSETS / case)
    golden = safetensors.numpy.load_file(str(ASSETS / case / "golden.safetensors"))
    want_BN = golden["greedy_tokens"]
    prompts_BT = golden["input_ids"][:, :8].astype(np.int32)
    out = inference.generate(params, cfg, prompts_BT, max_new_tokens=want_BN.shape[1], stop_tokens=())
    np.testing.assert_array_equal(np.asarray(out.tokens), want_BN)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_param_layout_matches_lm_init(case):
    cfg, params = hf.load_hf_checkpoint(ASSETS / case)
    want = jax.eval_shape(lambda: lm.init(cfg, jax.random.PRNGKey(0)))
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)  # noqa: E731
    assert shapes(params) == shapes(want)


def test_config_mapping():
    tied, _ = hf.load_hf_checkpoint(ASSETS / "llama_tied")
    assert (tied.tie_embeddings, tied.rope_theta, tied.eos_ids, tied.norm_eps) == (True, 500000.0, (2, 3), 1e-5)
    assert (tied.n_heads, tied.n_kv_heads, tied.head_dim, tied.d_ff) == (4, 4, 16, 96)
    sharded = hf.hf_config_to_lm_config(json.loads((ASSETS / "llama_sharded" / "config.json").read_text()))
    assert (sharded.n_layers, sharded.n_kv_heads, sharded.head_dim, sharded.vocab_size) == (3, 1, 32, 80)
    assert (sharded.bos_id, sharded.pad_id, sharded.max_seq_len, sharded.tie_embeddings) == (1, 0, 128, False)


def test_transformers_v4_config_and_overrides():
    """Older configs: top-level rope_theta, no head_dim / kv heads, pad None (kept None: no invented pad); overrides
    win."""
    hf_config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        rope_theta=1e6,
        rope_scaling=None,
        eos_token_id=2,
        pad_token_id=None,
    )
    cfg = hf.hf_config_to_lm_config(hf_config, scan_layers=False)
    assert (cfg.rope_theta, cfg.n_kv_heads, cfg.head_dim, cfg.pad_id, cfg.eos_ids) == (1e6, 2, 8, None, (2,))
    assert not cfg.scan_layers and not cfg.tie_embeddings


_BASE_HF = dict(
    model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24
)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_type="mamba"), "model_type"),
        (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_parameters.rope_type"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        hf.hf_config_to_lm_config({**_BASE_HF, **changes})


def test_tensor_problems_reported_together(tmp_path):
    """A removed, an extra and a mis-shaped tensor all appear, by name, in one ValueError."""
    folder = _copy_case("llama_gqa", tmp_path)
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.norm.weight"] = np.ones(63, np.float32)
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        hf.load_hf_checkpoint(folder)
    msg = str(err.value)
    assert "1 missing" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "1 unexpected" in msg and "model.layers.0.self_attn.q_proj.bias" in msg
    assert "mis-shaped" in msg and "model.norm.weight: shape [63], expected [64]" in msg


def test_layer_count_mismatch_lists_layers(tmp_path):
    folder = _copy_case("llama_gqa", tmp_path)
    _edit_config(folder, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_proj\.weight") as err:
        hf.load_hf_checkpoint(folder)
    assert "9 missing" in str(err.value)  # all 9 tensors of layer 2
    _edit_config(folder, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight \(layer 1 >= "):
        hf.load_hf_checkpoint(folder)


def test_sharded_index_pointing_to_absent_shard(tmp_path):
    folder = _copy_case("llama_sharded", tmp_path)
    (folder / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00007.safetensors"):
        hf.load_hf_checkpoint(folder)


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text((ASSETS / "llama_gqa" / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        hf.load_hf_checkpoint(tmp_path)


def test_unsupported_model_type_in_folder(tmp_path):
    folder = _copy_case("llama_gqa", tmp_path)
    _edit_config(folder, model_type="mamba")
    with pytest.raises(ValueError, match="model_type='mamba'"):
        hf.load_hf_checkpoint(folder)


def test_bfloat16_checkpoint_and_param_dtype(tmp_path):
    """bf16 files (unreadable by safe_open's numpy backend) load exactly; param_dtype casts the output."""
    folder = _copy_case("llama_gqa", tmp_path)
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    safetensors.numpy.save_file(bf16, str(folder / "model.safetensors"))
    _, got = hf.load_hf_checkpoint(folder)
    _, ref = hf.load_hf_checkpoint(ASSETS / "llama_gqa")
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), ref)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, rounded)
    cfg16, got16 = hf.load_hf_checkpoint(folder, param_dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(got16)} == {"bfloat16"}


def test_tied_checkpoint_with_redundant_lm_head(tmp_path):
    """Some tied checkpoints still store lm_head.weight: accepted iff it equals the embedding."""
    folder = _copy_case("llama_tied", tmp_path)
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
    cfg, params = hf.load_hf_checkpoint(folder)
    assert "lm_head" not in params
    assert max_logit_diff("llama_tied", cfg, params) <= PARITY_ATOL
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf.load_hf_checkpoint(folder)


@pytest.mark.parity
@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=2, num_hidden_layers=3, head_dim=8, vocab_size=50, rope_theta=1e5),
        dict(num_key_value_heads=4, tie_word_embeddings=True, hidden_size=32, intermediate_size=80),
    ],
)
def test_live_transformers_parity(tmp_path, overrides):
    """Same check against a freshly built transformers model (needs torch + transformers installed)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    script = pathlib.Path(__file__).parents[1] / "scripts" / "golden" / "hf_goldens.py"
    spec = importlib.util.spec_from_file_location("hf_goldens", script)
    goldens = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(goldens)
    model = goldens.build_model(overrides, seed=99)
    goldens.save_checkpoint(model, tmp_path, {})
    input_ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(input_ids=input_ids).logits.float().numpy()
    cfg, params = hf.load_hf_checkpoint(tmp_path)
    got = np.asarray(lm.apply(params, input_ids.numpy().astype(np.int32), cfg), np.float32)
    diff = float(np.abs(got - want).max())
    assert diff <= PARITY_ATOL, f"max |logits - transformers| = {diff:.3g} > {PARITY_ATOL}"
