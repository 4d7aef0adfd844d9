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
