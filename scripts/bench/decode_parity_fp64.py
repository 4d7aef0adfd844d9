"""Is a cached-vs-reference log-prob gap a cache error or fp32 rounding? Rerun both decodes in float64 and see.

    python -m scripts.bench.decode_parity_fp64 --workdir=runs/quickstart

Loads a finished train_lm run and compares `generate` (KV cache) with `reference_generate` (no cache) on the run's
decode-parity prompts (`train_lm.decode_parity`), greedy and sampled (T=1), twice: as shipped (fp32), and with the
weights and every computation in float64. A correct cache gives identical tokens and log-probs equal to float64
rounding (~1e-14) in the second pass; whatever gap the fp32 pass shows is then rounding.

The model code computes norms, RoPE, attention scores, logits and sampling in fp32 on purpose (`jnp.float32` casts).
For the float64 pass this diagnostic re-points those modules' `jnp.float32` at float64 and registers "float64" as a
model and KV-cache dtype. It patches modules in this process only; it is a diagnostic, not a supported float64 mode.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import operator
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "A finished train_lm workdir (config.json + checkpoints).")

_PATCHED = (
    "framework.models.lm",
    "framework.models.attention",
    "framework.inference.sampling",
    "framework.inference.generate",
    "framework.inference.reference",
    "framework.inference.kv_cache",
)


class _Float64Numpy:
    """`jnp` with `float32` meaning float64 (every other attribute unchanged)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, "float64" if name == "float32" else name)


def use_float64(setattr=setattr, setitem=operator.setitem) -> None:
    """Registers "float64" as a model and KV-cache dtype and re-points the fp32 casts of the model, cache, sampling
    and reference decode at float64 (needs jax_enable_x64). `setattr` / `setitem` do the patching: pytest's
    monkeypatch.setattr / setitem undo it after a test."""
    import jax.numpy as jnp
    import numpy as np

    from framework.inference import kv_cache
    from framework.models import config as model_config

    setitem(model_config._DTYPES, "float64", jnp.float64)
    setattr(kv_cache, "KV_DTYPES", (*kv_cache.KV_DTYPES, "float64"))
    setattr(importlib.import_module("framework.inference.reference"), "np", _Float64Numpy(np))  # host log-prob buffer
    for name in _PATCHED:
        setattr(importlib.import_module(name), "jnp", _Float64Numpy(jnp))


def main(argv):
    del argv
    import jax

    jax.config.update("jax_enable_x64", True)
    import ml_collections
    import numpy as np

    from experiments import train_lm
    from framework.training import loop
    from framework.training.checkpoint import Checkpointer

    with open(os.path.join(_WORKDIR.value, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model_cfg, task = train_lm.make_task(config)
    checkpointer = Checkpointer(os.path.join(_WORKDIR.value, "checkpoints"))
    step = checkpointer.latest_step()
    checkpointer.close()
    if step is None:
        raise SystemExit(f"{_WORKDIR.value} holds no checkpoint")
    config.train.steps, config.train.progress = step, False  # restore only: nothing left to train
    params = jax.device_get(loop.train(config, _WORKDIR.value, task).params)

    results = {"fp32": train_lm.decode_parity(params, model_cfg, config)}

    use_float64()
    cfg64 = dataclasses.replace(model_cfg, dtype="float64", param_dtype="float64")
    params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    results["fp64"] = train_lm.decode_parity(params64, cfg64, config)
    print(json.dumps({"workdir": _WORKDIR.value, "step": step, **results}, indent=1))


if __name__ == "__main__":
    app.run(main)
