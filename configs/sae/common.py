"""Shared builder of `sae` experiment configs (imports only configs.common and framework.sae.defaults, no jax)."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common
from framework.sae import defaults

HOOKPOINT = "blocks.1.resid_post"  # the tiny LM's last residual stream


def sae_experiment(arch: str, **sae_overrides) -> ml_collections.ConfigDict:
    """An `sae` experiment: LM (trained here, or loaded from lm.workdir), harvest, SAE training, eval, report."""
    config = ml_collections.ConfigDict()
    config.experiment = "sae"
    config.seed = 0
    # The LM: `lm.workdir` names a finished train_lm workdir to load; unset, `lm.train_lm` is trained here.
    lm_cfg = common.mod10_lm(steps=1500, lr=1e-2)  # the shared mod-10 LM, trained faster (lr) for a fixed 1500 steps
    config.lm = ml_collections.ConfigDict({"workdir": config_dict.placeholder(str), "train_lm": lm_cfg})
    # An imported model (model.hf_path) reads `text_file`, a local plain-text file tokenized by the folder's
    # tokenizer.json (a file of whitespace-separated token ids when the folder has none), cut into rows of seq_len
    # tokens (BOS first where the model has one); every tenth row is held out for eval. The arithmetic LM reads its
    # own task instead and ignores both.
    config.harvest = ml_collections.ConfigDict(
        dict(
            hookpoints=(HOOKPOINT,),
            train_tokens=200_000,
            eval_tokens=16_384,
            batch_size=64,
            dtype="float32",
            text_file=config_dict.placeholder(str),
            seq_len=128,
        )
    )
    config.sae = defaults.default_config(arch, d_in=common.MODEL_SIZES["tiny"]["d_model"], n_latents=512)
    config.sae.hookpoint = HOOKPOINT
    config.sae.update(sae_overrides)
    config.train = ml_collections.ConfigDict(dict(steps=3000, batch_size=1024, checkpoint_every=500))
    config.eval = ml_collections.ConfigDict(dict(splice_batches=4))
    config.report = ml_collections.ConfigDict(dict(n_features=24, top_contexts=8))
    # data = all devices; --config.mesh.tensor=2 (and data=-1) splits the latents of a wide SAE (rule "latents").
    config.mesh = common.mesh_config()
    # `model` is the LM's model section itself (one object, two names), so `--config.model.*` works here as in every
    # training config; it has no effect when `lm.workdir` loads a trained LM (that LM's own config.json decides).
    # `--config.model.hf_path=<folder>` reads an imported HF checkpoint instead (its config.json decides the model;
    # sae.d_in must be its d_model).
    config.model = lm_cfg.model
    return config
