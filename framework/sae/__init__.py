"""Sparse autoencoders and transcoders on any hookpoint of a Lumen LM.

  sae_cfg = framework.sae.default_config("topk"); sae_cfg.d_in = 64
  sae_params, metrics = framework.sae.fit(acts_ND, sae_cfg, steps=2000, batch_size=1024, seed=0)
  latents = framework.sae.encode(sae_params, sae_cfg, x); x_hat = framework.sae.decode(sae_params, sae_cfg, latents)
  framework.sae.decoder_directions(sae_params, sae_cfg)  # [n_latents, d_in] unit rows

Modules: defaults (configs; imports only ml_collections), model (architectures and losses), train (`fit`, with the
training loop's checkpoints, finiteness policy, metrics writer and resume), source (training data in chunks),
metrics, store (activation harvest to memory-mapped files + shuffling buffer), report (feature report HTML).
Attributes load lazily, so `from framework.sae import defaults` (as configs do) does not import jax.
"""

from __future__ import annotations

import importlib

from framework.sae.defaults import ARCHS, SAEConfig, default_config, parse

_LAZY = {
    "fit": ("framework.sae.train", "fit"),
    "encode": ("framework.sae.model", "encode"),
    "decode": ("framework.sae.model", "decode"),
    "decoder_directions": ("framework.sae.model", "decoder_directions"),
    "init_params": ("framework.sae.model", "init_params"),
    "ActivationStore": ("framework.sae.store", "ActivationStore"),
    "harvest": ("framework.sae.store", "harvest"),
    "write_report": ("framework.sae.report", "write_report"),
}
_SUBMODULES = ("model", "train", "source", "metrics", "store", "report")

__all__ = ["ARCHS", "SAEConfig", "default_config", "parse", *_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"framework.sae.{name}")
    else:
        raise AttributeError(f"module 'framework.sae' has no attribute {name!r}")
    globals()[name] = value
    return value
