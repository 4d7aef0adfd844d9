"""Export writes back what came in: config.json field by field, null special ids, side files; quantised models
(dequantised, tree-level `quant.dequantize`) and LoRA-adapted ones (merged) load in transformers.

The GPTQ fixture `tests/assets/hf/qwen2_nobos/gptq_int4_logits.safetensors` holds transformers' logits of the
export that `scripts/golden/hf_export_goldens.py` writes (its docstring has the two commands); the `parity` test
redoes that comparison live with the parity venv.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from hf_golden import ASSETS
from hf_golden import CASES as OLD_CASES

from framework import peft, quant
from framework.models import hf, lm

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = (*OLD_CASES, "llama_nopad", "qwen2_nobos", "gemma2_ids")
_spec = importlib.util.spec_from_file_location("hf_export_goldens", ROOT / "scripts/golden/hf_export_goldens.py")
export_goldens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_goldens)


def _json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def _equal_trees(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("case", CASES)
def test_exported_config_equals_the_original_field_by_field(case, tmp_path):
    cfg, params = hf.load_hf_checkpoint(ASSETS / case)
    out = hf.save_hf_checkpoint(params, cfg, tmp_path / case, source=ASSETS / case)
    original, exported = _json(ASSETS / case / "config.json"), _json(out / "config.json")
    for key, value in original.items():
        assert key in exported and exported[key] == value, (key, value, exported.get(key))
    for name in hf.SIDE_FILES:
        if (ASSETS / case / name).exists():
            assert (out / name).read_bytes() == (ASSETS / case / name).read_bytes(), name
    cfg2, params2 = hf.load_hf_checkpoint(out)
    assert cfg2 == cfg
    _equal_trees(params, params2)


def test_null_special_ids_stay_null_and_a_changed_field_is_the_only_change(tmp_path):
    for case, nulls in (("llama_nopad", ["pad_token_id"]), ("qwen2_nobos", ["bos_token_id", "pad_token_id"])):
        cfg, params = hf.load_hf_checkpoint(ASSETS / case)
        exported = _json(hf.save_hf_checkpoint(params, cfg, tmp_path / case) / "config.json")  # no source
        assert all(exported[k] is None for k in nulls), exported
    cfg, params = hf.load_hf_checkpoint(ASSETS / "qwen2_nobos")
    changed = dataclasses.replace(cfg, eos_ids=(2, 5))
    out = hf.save_hf_checkpoint(params, changed, tmp_path / "eos", source=ASSETS / "qwen2_nobos")
    original, exported = _json(ASSETS / "qwen2_nobos" / "config.json"), _json(out / "config.json")
    assert exported["eos_token_id"] == [2, 5] and exported["max_window_layers"] == 28
    assert {k for k, v in original.items() if exported[k] != v} == {"eos_token_id"}
    assert hf.load_hf_checkpoint(out)[0] == changed
    with pytest.raises(ValueError, match="cannot be written as the source's model_type='gemma2'"):
        hf.save_hf_checkpoint(params, cfg, tmp_path / "x", source=ASSETS / "gemma2_ids")
    with pytest.raises(ValueError, match="model_type='llama' but the source config is model_type='qwen2'"):
        hf.save_hf_checkpoint(params, cfg, tmp_path / "y", model_type="llama", source=ASSETS / "qwen2_nobos")


@pytest.fixture(scope="module")
def gptq():
    cfg, qparams = export_goldens.quantized_case("qwen2_nobos")
    return cfg, qparams


def test_dequantize_restores_the_param_layout(gptq):
    cfg, qparams = gptq
    dense = quant.dequantize(qparams)
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, str(x.dtype)), t)  # noqa: E731
    assert shapes(dense) == shapes(hf.load_hf_checkpoint(ASSETS / "qwen2_nobos")[1])
    q = qparams["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(dense["layers"]["mlp"]["up_proj"]["kernel"], q.dequantize())
    w8a8_cfg = quant.QuantConfig(fmt="int8", act_quant=True, targets="layers/mlp/up_proj/kernel")
    w8a8 = quant.quantize(dense, w8a8_cfg, "rtn", model_cfg=cfg)
    with pytest.raises(ValueError, match=r"layers/mlp/up_proj/kernel is W8A8"):
        quant.dequantize(w8a8)


def test_gptq_int4_export_loads_in_transformers_with_lumens_logits(gptq, tmp_path):
    """transformers' logits of the export (the committed fixture) equal Lumen's quantised logits within 1e-4."""
    cfg, qparams = gptq
    ids = safetensors.numpy.load_file(str(ASSETS / "qwen2_nobos" / "golden.safetensors"))["input_ids"]
    theirs = safetensors.numpy.load_file(str(ASSETS / "qwen2_nobos" / export_goldens.LOGITS_FILE))["logits"]
    mine = np.asarray(lm.apply(qparams, ids.astype(np.int32), cfg))
    assert float(np.abs(mine - theirs).max()) <= 1e-4
    out = export_goldens.export_case("qwen2_nobos", tmp_path, gptq)
    assert "DEQUANTISED" in (out / "README.md").read_text()
    cfg2, params2 = hf.load_hf_checkpoint(out)
    assert cfg2 == cfg and _json(out / "config.json")["pad_token_id"] is None
    _equal_trees(params2, quant.dequantize(qparams))


def test_lora_adapted_model_exports_merged(tmp_path):
    cfg, params = hf.load_hf_checkpoint(ASSETS / "llama_nopad")
    adapted = peft.add_adapters(params, peft.LoraConfig(rank=2), jax.random.key(0), model_cfg=cfg)
    ad = peft.adapter_params(adapted)
    rng = np.random.default_rng(1)
    ad = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32), ad)
    adapted = peft.set_adapters(adapted, ad)
    out = hf.save_hf_checkpoint(adapted, cfg, tmp_path / "lora", source=ASSETS / "llama_nopad")
    assert "merged" in (out / "README.md").read_text()
    assert (out / hf.TOKENIZER_FILE).exists()
    _equal_trees(hf.load_hf_checkpoint(out)[1], peft.merge(adapted))


def _parity_python() -> str | None:
    """A python with torch + transformers: this one (`make parity`), or .venv-parity when LUMEN_PARITY=1."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    venv = ROOT / ".venv-parity" / "bin" / "python"
    return str(venv) if venv.exists() and os.environ.get("LUMEN_PARITY") == "1" else None


@pytest.mark.parity
@pytest.mark.skipif(_parity_python() is None, reason="needs torch (make parity) or LUMEN_PARITY=1 with .venv-parity")
def test_live_gptq_export_in_transformers(gptq, tmp_path):
    """The export, loaded by transformers now: its logits equal Lumen's quantised logits within 1e-4."""
    cfg, qparams = gptq
    export_goldens.export_case("qwen2_nobos", tmp_path / "export", gptq)
    logits_dir = tmp_path / "logits"
    (logits_dir / "qwen2_nobos").mkdir(parents=True)
    (logits_dir / "qwen2_nobos" / "golden.safetensors").symlink_to(ASSETS / "qwen2_nobos" / "golden.safetensors")
    cmd = [_parity_python(), "scripts/golden/hf_goldens.py", "--out", str(logits_dir), "--save-logits"]
    subprocess.run([*cmd, str(tmp_path / "export"), "--logits-name", "live.safetensors"], cwd=ROOT, check=True)
    theirs = safetensors.numpy.load_file(str(logits_dir / "qwen2_nobos" / "live.safetensors"))["logits"]
    ids = safetensors.numpy.load_file(str(ASSETS / "qwen2_nobos" / "golden.safetensors"))["input_ids"]
    assert float(np.abs(np.asarray(lm.apply(qparams, ids.astype(np.int32), cfg)) - theirs).max()) <= 1e-4
