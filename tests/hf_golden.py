"""The committed HF golden fixtures (tests/assets/hf, made by scripts/golden/hf_goldens.py with real `transformers`)
and the parity check shared by tests/test_hf.py and tests/test_hf_families.py."""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import safetensors.numpy

from framework.models import hf, lm

ASSETS = pathlib.Path(__file__).parent / "assets" / "hf"
CASES = (
    "llama_gqa",
    "llama_tied",
    "llama_sharded",
    "qwen2_bias",
    "mistral_window",
    "gemma_geglu",
    "gemma2_softcap",
)
# fp32 logits of |x| ~ 5 after a few layers: 1e-4 allows only accumulation-order noise. Never loosen it.
PARITY_ATOL = 1e-4


@functools.cache
def load(case: str):
    """(model_cfg, params) of a golden case, loaded once per test process."""
    return hf.load_hf_checkpoint(ASSETS / case)


def golden(case: str) -> dict[str, np.ndarray]:
    """The case's `input_ids` and transformers' fp32 `logits` (plus greedy tokens where recorded)."""
    return safetensors.numpy.load_file(str(ASSETS / case / "golden.safetensors"))


_apply = jax.jit(lm.apply, static_argnums=2)  # one compile per config beats eager op-by-op dispatch here


def max_logit_diff(case: str, cfg: lm.LMConfig, params) -> float:
    """max |Lumen logits - transformers logits| on the case's golden inputs."""
    g = golden(case)
    logits_BTV = _apply(params, g["input_ids"].astype(np.int32), cfg)
    assert logits_BTV.shape == g["logits"].shape
    return float(np.abs(np.asarray(logits_BTV, np.float32) - g["logits"]).max())
