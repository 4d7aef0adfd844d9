"""SAE frontiers on CPU: (1) FVU and delta LM loss vs L0 per architecture at fixed width; (2) dead-latent fraction
vs width with and without tied init + AuxK.

  python -m scripts.reproduce.sae_frontier --workdir=runs/sae_frontier [--lm_workdir=runs/quickstart]

The LM is the quickstart-sized tiny LM (loaded from --lm_workdir, e.g. a quickstart run, or trained into
<workdir>/lm by `configs/sae/common.py`'s recipe); activations of blocks.1.resid_post are harvested once (train and
eval splits) and every SAE trains from that store. Writes <workdir>/results/sae_frontier.json and
<workdir>/figures/sae_frontier.png.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from configs.sae.common import sae_experiment
from experiments import sae as sae_exp
from framework import sae

_WORKDIR = flags.DEFINE_string("workdir", "runs/sae_frontier", "Output directory.")
_LM_WORKDIR = flags.DEFINE_string("lm_workdir", None, "A finished train_lm workdir to load (default: train one).")
_STEPS = flags.DEFINE_integer("steps", 1500, "SAE training steps per point.")
_BATCH = flags.DEFINE_integer("batch_size", 512, "SAE batch size.")
_TOKENS = flags.DEFINE_integer("train_tokens", 100_000, "Harvested training tokens.")
_WIDTH = flags.DEFINE_integer("width", 512, "Latents for the L0 frontier.")
_WIDTHS = flags.DEFINE_list("widths", ["256", "1024", "2048"], "Latents for the dead-latent study.")
_PARTS = flags.DEFINE_list(
    "parts", ["frontier", "dead"], "What to (re)run: frontier and/or dead; a part not run is kept from an old JSON."
)

# Sparsity knob per architecture, from dense to sparse.
SWEEPS = {
    "relu": ("l1_coeff", [0.5, 1.0, 2.0, 4.0]),
    "topk": ("k", [4, 8, 16, 32]),
    "batchtopk": ("k", [4, 8, 16, 32]),
    "jumprelu": ("l0_coeff", [0.1, 0.3, 1.0, 3.0]),
}


def _point(train_store, eval_x, params, model_cfg, lm_config, config, cfg):
    t0 = time.perf_counter()
    sae_params, m = sae.fit(
        train_store, cfg, steps=_STEPS.value, batch_size=_BATCH.value, seed=config.seed, eval_activations=eval_x
    )
    config.sae = cfg
    splice = sae_exp.splice_metrics(params, model_cfg, lm_config, sae_params, config.sae, config.eval.splice_batches)
    f = m["final"]
    # Dead over the whole harvest (the 8192 held-out tokens are too short a window: a latent of density 1e-4 fires
    # there about once, so "silent on held out" mixes rare latents with dead ones; both are reported).
    counts = sae.metrics.firing_counts(sae_params, cfg, np.asarray(train_store.array(cfg.hookpoint)))
    return {
        "l0": f["l0"],
        "fvu": f["fvu"],
        "dead_fraction": f["dead_fraction"],
        "dead_fraction_train": f["dead_fraction_train"],
        "dead_fraction_harvest": float(np.mean(counts == 0)),
        "rare_fraction_harvest": float(np.mean(counts < 1e-4 * train_store.num_tokens)),  # density < 1e-4
        "delta_lm_loss": splice["delta_lm_loss"],
        "ce_loss_recovered": splice["ce_loss_recovered"],
        "seconds": time.perf_counter() - t0,
    }


def main(argv):
    del argv
    workdir = _WORKDIR.value
    config = sae_experiment("topk")
    config.harvest.train_tokens = _TOKENS.value
    config.harvest.eval_tokens = 8192
    config.lm.workdir = _LM_WORKDIR.value
    params, model_cfg, lm_config = sae_exp.load_or_train_lm(config, workdir)
    train_store = sae_exp.harvest_split(
        params, model_cfg, lm_config, config, os.path.join(workdir, "activations"), "train", config.harvest.train_tokens
    )
    eval_store = sae_exp.harvest_split(
        params,
        model_cfg,
        lm_config,
        config,
        os.path.join(workdir, "activations_eval"),
        "eval",
        config.harvest.eval_tokens,
    )
    eval_x = np.asarray(eval_store.array(config.sae.hookpoint))
    d = model_cfg.d_model
    results = {
        "command": "python -m scripts.reproduce.sae_frontier "
        + " ".join(
            f"--{k}={v}"
            for k, v in (
                ("workdir", workdir),
                ("lm_workdir", _LM_WORKDIR.value),
                ("steps", _STEPS.value),
                ("batch_size", _BATCH.value),
                ("train_tokens", _TOKENS.value),
            )
            if v is not None
        ),
        "hookpoint": config.sae.hookpoint,
        "width": _WIDTH.value,
        "frontier": {},
        "dead_vs_width": {},
    }
    path = os.path.join(workdir, "results", "sae_frontier.json")
    unknown = sorted(set(_PARTS.value) - {"frontier", "dead"})
    if unknown:
        raise ValueError(f"--parts has {unknown}; expected some of ['frontier', 'dead']")
    if set(_PARTS.value) != {"frontier", "dead"}:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--parts={','.join(_PARTS.value)} keeps the other part from {path}: missing")
        with open(path) as f:
            old = json.load(f)
        results["frontier"], results["dead_vs_width"] = old["frontier"], old["dead_vs_width"]
        results["command"] += f" --parts={','.join(_PARTS.value)}"
    for arch, (knob, values) in SWEEPS.items() if "frontier" in _PARTS.value else ():
        rows = []
        for v in values:
            cfg = sae.default_config(arch, d_in=d, n_latents=_WIDTH.value, hookpoint=config.sae.hookpoint)
            cfg[knob] = v
            row = dict(_point(train_store, eval_x, params, model_cfg, lm_config, config, cfg), **{knob: v})
            print(arch, json.dumps(row))
            rows.append(row)
        results["frontier"][arch] = rows
    for tricks in (True, False) if "dead" in _PARTS.value else ():
        rows = []
        for width in [int(w) for w in _WIDTHS.value]:
            cfg = sae.default_config(
                "topk",
                d_in=d,
                n_latents=width,
                k=16,
                hookpoint=config.sae.hookpoint,
                tied_init=tricks,
                aux_k=64 if tricks else 0,
            )
            row = dict(_point(train_store, eval_x, params, model_cfg, lm_config, config, cfg), width=width)
            print("dead", tricks, json.dumps(row))
            rows.append(row)
        results["dead_vs_width"]["tied_init+auxk" if tricks else "plain"] = rows
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, os.path.join(workdir, "figures", "sae_frontier.png"))
    print(f"wrote {workdir}/results/sae_frontier.json and {workdir}/figures/sae_frontier.png")


def _plot(results, path):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for arch, rows in results["frontier"].items():
        rows = sorted(rows, key=lambda r: r["l0"])
        axes[0].plot([r["l0"] for r in rows], [r["fvu"] for r in rows], marker="o", label=arch)
        axes[1].plot([r["l0"] for r in rows], [r["delta_lm_loss"] for r in rows], marker="o", label=arch)
    axes[0].set(xlabel="L0", ylabel="FVU (held out)", xscale="log", yscale="log", title="FVU vs L0")
    axes[1].set(xlabel="L0", ylabel="delta LM loss (nats)", xscale="log", title="spliced LM loss vs L0")
    for name, rows in results["dead_vs_width"].items():
        key = "dead_fraction_harvest" if "dead_fraction_harvest" in rows[0] else "dead_fraction"
        axes[2].plot([r["width"] for r in rows], [r[key] for r in rows], marker="o", label=name)
    axes[2].set(xlabel="latents", ylabel="silent on all train tokens", xscale="log", title="TopK k=16: dead latents")
    for ax in axes:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log axes: no overlapping minor labels
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
