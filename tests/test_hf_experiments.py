"""Experiments on imported checkpoints: `--config.model.hf_path=<folder>` trains an SAE on a committed HF golden from
a local text file (tokenized by the folder's tokenizer.json, or token ids when it has none) and writes the report."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hf_golden import ASSETS

from configs.sae import topk
from experiments import sae as sae_exp
from experiments import train_lm
from framework import config as config_lib
from framework.models import hf
from framework.sae import store as store_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog; 0 and 1 are digits, not padding.\n" * 60


def _config(**changes):
    config = topk.get_config()
    config.unlock()
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        node = config
        for part in filter(None, section.split(".")):
            node = node[part]
        node[field] = value
    return config


def test_launch_trains_an_sae_on_an_imported_model(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    flags = dict(
        model_hf_path=ASSETS / "llama_nopad",
        harvest_text_file=text,
        sae_d_in=32,
        sae_n_latents=32,
        sae_k=4,
        sae_steps_per_call=10,
        sae_log_every=10,
        harvest_seq_len=32,
        harvest_train_tokens=1024,
        harvest_eval_tokens=256,
        harvest_batch_size=8,
        train_steps=20,
        train_batch_size=64,
        train_checkpoint_every=20,
        eval_splice_batches=1,
        report_n_features=4,
    )
    args = [f"--config.{k.replace('_', '.', 1)}={v}" for k, v in flags.items()]
    cmd = [sys.executable, "-m", "scripts.launch", "--config=configs/sae/topk.py", f"--workdir={workdir}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((workdir / "results" / "sae_metrics.json").read_text())
    splice = results["splice"]
    assert splice["ce_loss_recovered_defined"] == (splice["zero_ablation_loss"] > splice["clean_loss"])
    assert (splice["ce_loss_recovered"] is None) != splice["ce_loss_recovered_defined"]
    assert results["eval"]["l0"] <= 4 + 1e-6 and 0 <= results["eval"]["fvu"] < 1.5
    st = store_lib.ActivationStore.open(str(workdir / "activations"))
    assert st.num_tokens == 1024 and st.meta["model"]["pad_id"] is None
    idx = st.token_index
    kept = st.contexts[idx[:, 0], idx[:, 1]]
    assert np.all(st.contexts[:, 0] == 1) and not np.any(kept == 1)  # each row starts with BOS; BOS is not harvested
    page = (workdir / "report" / "features.html").read_text()
    assert "<mark>" in page and "quick" in page  # the model's own tokenizer renders the contexts
    assert "CE loss recovered" in page


def test_text_rows_from_token_ids_when_the_folder_has_no_tokenizer(tmp_path):
    ids = np.arange(250) % 96  # ids 0, 1 and 2 included: content, Qwen2 has no BOS and no pad
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    config = _config(**{"model.hf_path": str(ASSETS / "qwen2_nobos"), "harvest.text_file": str(tmp_path / "ids.txt")})
    config.harvest.seq_len = 20
    model_cfg = sae_exp.validate(config)
    source = sae_exp._lm_config(config)
    train, held_out = sae_exp.text_rows(source, model_cfg, "train"), sae_exp.text_rows(source, model_cfg, "eval")
    np.testing.assert_array_equal(held_out, ids[180:200][None])  # row 9 of 12 is held out
    np.testing.assert_array_equal(
        np.concatenate([train[:9].reshape(-1), train[9:].reshape(-1)]), np.r_[ids[:180], ids[200:240]]
    )
    batch = next(sae_exp.text_batches(source, model_cfg, "train", 4))
    assert store_lib.token_mask(batch, model_cfg).all()  # every position of every row is a real token
    (tmp_path / "bad.txt").write_text("1 2 three")
    with pytest.raises(ValueError, match="no tokenizer.json, so the file must hold whitespace-separated token ids"):
        sae_exp.text_rows(_with(source, text_file=str(tmp_path / "bad.txt")), model_cfg, "train")


def _with(source, **changes):
    out = source.copy_and_resolve_references()
    out.update(changes)
    return out


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"model.hf_path": "/nonexistent/folder", "harvest.text_file": __file__}, "model.hf_path"),
        ({"model.hf_path": str(ASSETS / "llama_nopad")}, "harvest.text_file"),
        (
            {"model.hf_path": str(ASSETS / "qwen2_nobos"), "harvest.text_file": __file__, "lm.workdir": "x"},
            "lm.workdir",
        ),
        ({"model.hf_path": str(ASSETS / "llama_nopad"), "harvest.text_file": __file__}, "sae.d_in"),
    ],
)
def test_imported_model_config_errors_name_the_key(changes, key):
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        sae_exp.validate(_config(**changes))


def test_train_lm_refuses_an_imported_checkpoint_and_lmconfig_names_hf_path():
    config = _config()
    lm_config = config.lm.train_lm
    lm_config.model.hf_path = str(ASSETS / "llama_nopad")
    with pytest.raises(config_lib.ConfigError, match="model.hf_path"):
        train_lm.validate(lm_config)
    with pytest.raises(ValueError, match="model.hf_path=.*model_from_config"):
        hf.LMConfig.from_config(lm_config.model)
    lm_config.model.hf_path = None
    assert hf.LMConfig.from_config(lm_config.model).pad_id == 0  # the arithmetic LM keeps its ids


@pytest.fixture(scope="module")
def qwen_ids_file(tmp_path_factory):
    """A text file of token ids for the Qwen2 golden (no tokenizer.json): ids 0 and 1 are content there."""
    path = tmp_path_factory.mktemp("ids") / "ids.txt"
    path.write_text(" ".join(map(str, np.random.default_rng(0).integers(0, 96, 400))))
    return str(path)


@pytest.mark.slow  # ~10 CPU-s of compiles (scorer, GPTQ calibration); calibration masks are fast-tested elsewhere
def test_quantisation_study_on_an_imported_model(qwen_ids_file, tmp_path):
    """The quantisation study with --hf_path: calibrated on the file's train rows, scored on its held-out rows by
    loss, logit error and top-1 agreement against the float model; the exported GPTQ model scores as the quantised
    one did (it is the same model, dequantised)."""
    from scripts.reproduce import quantization_hf

    settings = [("int3 g32", dict(fmt="int4", bits=3, group_size=32), ("gptq",))]
    path = str(ASSETS / "qwen2_nobos")
    kw = dict(settings=settings, seq_len=16, calib_tokens=64, eval_rows=2, export_setting="int3 g32 gptq")
    out = quantization_hf.run(path, qwen_ids_file, str(tmp_path), **kw)
    rows = {(r["setting"], r["method"]): r for r in out["rows"]}
    assert list(rows) == [("fp32", "-"), ("bf16", "-"), ("int3 g32", "gptq")]
    fp32, bf16, int3 = rows["fp32", "-"], rows["bf16", "-"], rows["int3 g32", "gptq"]
    assert fp32["logit_max_abs_err"] == 0 and fp32["top1_agreement"] == 1
    assert 0 < bf16["logit_mean_abs_err"] < int3["logit_mean_abs_err"] and bf16["weight_bytes"] > int3["weight_bytes"]
    assert int3["top1_agreement"] < 1
    assert out["eval_tokens"] == 2 * 16 and out["calib_tokens"] == 4 * 16  # no BOS: rows are 16 file tokens
    cfg, float_params = hf.load_hf_checkpoint(path)
    exported_cfg, exported = hf.load_hf_checkpoint(out["exported"])
    held_out = quantization_hf.text_batches(
        hf.text_rows(hf.text_file_ids(qwen_ids_file, path, cfg, key="f"), 16, None, "eval", key="f"), 2
    )
    again = quantization_hf.evaluate(quantization_hf.make_scorer(cfg), exported, float_params, held_out, cfg.vocab_size)
    assert exported_cfg.pad_id is None and exported_cfg.bos_id is None
    assert again["eval_loss"] == pytest.approx(int3["eval_loss"], abs=1e-5)
    assert again["logit_max_abs_err"] == pytest.approx(int3["logit_max_abs_err"], abs=1e-4)


@pytest.mark.slow  # a training compile on 8 devices (~15 CPU-s); merged-LoRA export is fast-tested in test_hf_export
def test_lora_adapts_an_imported_model_on_a_text_file_and_exports_it_merged(tmp_path):
    """LoRA on the Llama golden, next-token loss on a local text file (its own tokenizer), on the one loop: the
    merged model's held-out loss moves off the base's, and the export reloads with the merged logits and the
    original config.json, field for field (null pad included)."""
    import optax

    from scripts.reproduce import lora_hf  # not scripts.reproduce.lora: its absl flags would clash in this process

    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    path = str(ASSETS / "llama_nopad")
    kw = dict(methods=["lora"], ranks=[2], lrs=[3e-2], seeds=[0], steps=4, seq_len=16)
    out = lora_hf.run(
        path,
        str(text),
        str(tmp_path / "run"),
        variants={"lora": {}},
        schedule=lambda lr, _: optax.constant_schedule(lr),
        **kw,
    )
    (row,) = out["rows"]
    assert row["trainable_params"] > 0 and row["eval_loss"] != out["base_eval_loss"]
    records = [
        json.loads(line) for line in open(tmp_path / "run" / "runs" / "lora_r2_lr0.03_s0_4steps" / "metrics.jsonl")
    ]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
    assert out["export"]["reloaded_max_abs_logit_diff"] <= 1e-5
    original = json.loads((ASSETS / "llama_nopad" / "config.json").read_text())
    exported = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert {k: exported.get(k) for k in original} == original and original["pad_token_id"] is None
    assert (tmp_path / "run" / "export" / "tokenizer.json").exists()
