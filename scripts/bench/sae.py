"""Training throughput of a TopK SAE: Lumen (JAX) vs SAELens (PyTorch, CPU) on identical cached activations.

  python -m scripts.bench.sae --store=runs/sae_frontier/activations [--steps=300 --n_latents=512 --k=16]

Both train the same width, k, batch size, steps and Adam settings (constant LR, betas 0.9/0.999, clip 1.0, AuxK
on dead latents weighted by min(n_dead / aux_k, 1), tied init, b_dec at zero, decoder rows not projected to unit
norm, latents ranked by pre-activation x decoder-row norm as SAELens' rescale_acts_by_decoder_norm does) on the same
rows, pre-scaled to mean squared norm d_in; both report FVU on the same held-out rows (<store>_eval, else the last
10% of the store), L0, the fraction of latents dead at the end of training (no firing in the last dead_window
training tokens) and the training-batch FVU every 50 steps. SAELens runs in --torch_python (a Python with torch
and sae-lens: `.venv-parity/bin/pip install sae-lens`); without it only Lumen is measured. Records its section in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import jax
import numpy as np

from framework import sae
from scripts.bench import common


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="runs/sae_frontier/activations")
    p.add_argument("--hookpoint", default="blocks.1.resid_post")
    p.add_argument("--n_latents", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--torch_python", default=os.path.join(common.REPO, ".venv-parity", "bin", "python"))
    p.add_argument("--no_append", action="store_true")
    p.add_argument(
        "--rank_by_decoder_norm",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: both rank latents by pre-activation x decoder-row norm (SAELens' default); 0: by pre-activation",
    )
    args = p.parse_args(argv)

    store = sae.ActivationStore.open(args.store)
    x = np.asarray(store.array(args.hookpoint), np.float32)
    eval_path = args.store.rstrip("/") + "_eval"
    if os.path.exists(os.path.join(eval_path, "meta.json")):
        x_eval = np.asarray(sae.ActivationStore.open(eval_path).array(args.hookpoint), np.float32)
    else:
        x, x_eval = x[: int(0.9 * len(x))], x[int(0.9 * len(x)) :]
    scale = np.sqrt(x.shape[1] / np.mean(np.sum(x.astype(np.float64) ** 2, axis=1)))
    x, x_eval = (x * scale).astype(np.float32), (x_eval * scale).astype(np.float32)
    dead_window = 10 * args.batch_size
    monitor = common.ContentionMonitor()

    cfg = sae.default_config(
        "topk",
        d_in=x.shape[1],
        n_latents=args.n_latents,
        k=args.k,
        lr=args.lr,
        lr_decay="none",
        lr_warmup_steps=0,
        normalize_inputs=False,
        aux_k=x.shape[1] // 2,
        aux_k_coeff=1.0,
        # SAELens (after EleutherAI's sae) weights its AuxK loss by min(n_dead / aux_k, 1). At 2048 latents / k=32
        # (~7 of 2048 dead) Lumen's unweighted AuxK held its FVU at 0.0158-0.0162 against SAELens' 0.0137.
        aux_k_dead_scale=True,
        dead_window=dead_window,
        b_dec_init="zeros",
        # SAELens's TopK leaves the decoder unconstrained (it rescales activations by decoder norms instead of
        # projecting rows to unit norm); projecting after every step cost Lumen 6% FVU here (0.0228 vs 0.0215).
        normalize_decoder=False,
        # ... and ranks latents by pre-activation x decoder-row norm (rescale_acts_by_decoder_norm, its default).
        rank_by_decoder_norm=bool(args.rank_by_decoder_norm),
        steps_per_call=50,
        log_every=50,
    )
    _, m = sae.fit(x, cfg, steps=args.steps, batch_size=args.batch_size, seed=0, eval_activations=x_eval)
    f = m["final"]
    rows = [
        [
            "Lumen (JAX " + jax.__version__ + ")",
            f"{m['tokens_per_s']:,.0f}",
            f"{f['fvu']:.4f}",
            f"{f['l0']:.1f}",
            f"{f['dead_fraction_train']:.3f}",
        ]
    ]
    trajectories = {"Lumen": [h["fvu"] for h in m["history"]]}
    ref = None
    if os.path.exists(args.torch_python):
        # torch's OpenMP threads spin: on a loaded machine 2 threads ran 13x slower than 1 (measured). Run both
        # thread counts and keep the faster, so the comparison is against SAELens at its best here.
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            np.save(os.path.join(tmp, "train.npy"), x)
            np.save(os.path.join(tmp, "eval.npy"), x_eval)
            worker = os.path.join(common.REPO, "scripts", "bench", "sae_lens_worker.py")
            for threads in sorted({1, common.num_cores()}):
                spec = dict(
                    n_latents=args.n_latents,
                    k=args.k,
                    batch_size=args.batch_size,
                    steps=args.steps,
                    lr=args.lr,
                    seed=0,
                    threads=threads,
                    dead_window=dead_window,
                    log_every=50,
                    rescale_acts_by_decoder_norm=bool(args.rank_by_decoder_norm),
                )
                res = subprocess.run(
                    [
                        args.torch_python,
                        worker,
                        os.path.join(tmp, "train.npy"),
                        os.path.join(tmp, "eval.npy"),
                        json.dumps(spec),
                    ],
                    capture_output=True,
                    text=True,
                )
                if res.returncode != 0:
                    print("SAELens worker failed:\n" + res.stderr[-2000:])
                    continue
                results.append(dict(json.loads(res.stdout.strip().splitlines()[-1]), threads=threads))
        for r in results:
            rows.append(
                [
                    f"SAELens (torch {r['torch']}, {r['threads']} thread(s))",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['fvu']:.4f}",
                    f"{r['l0']:.1f}",
                    f"{r['dead_fraction_train']:.3f}",
                ]
            )
            trajectories[f"SAELens ({r['threads']} thread(s))"] = [h["fvu"] for h in r["history"]]
        ref = max(results, key=lambda r: r["tokens_per_s"]) if results else None
    body = common.markdown_table(
        ["implementation", "train tokens/s", "held-out FVU", "held-out L0", "dead at end (train window)"], rows
    )
    body += (
        f"\n\nTopK SAE, {args.n_latents} latents, k={args.k}, batch {args.batch_size}, {args.steps} steps, "
        f"{len(x)} cached tokens of {args.hookpoint} (d={x.shape[1]}), FVU on {len(x_eval)} held-out tokens."
    )
    if ref:
        body += (
            " Lumen/SAELens throughput (SAELens at its faster thread count): "
            f"{m['tokens_per_s'] / ref['tokens_per_s']:.2f}x; "
            f"FVU difference {m['final']['fvu'] - ref['fvu']:+.4f}."
        )
    else:
        body += " SAELens not measured (no torch Python with sae-lens at --torch_python)."
    body += (
        f" Dead: no firing in the last {dead_window} training tokens. Training-batch FVU, mean of each 50 steps: "
        + ("; ".join(f"{name} " + " ".join(f"{v:.4f}" for v in fvus) for name, fvus in trajectories.items()))
        + "."
    )
    entry = common.Entry(
        title="SAE training throughput (Lumen vs SAELens)",
        command=common.command_line("scripts.bench.sae", argv),
        versions={"jax": jax.__version__, "sae-lens": ref["sae_lens"] if ref else "absent"},
        body=body,
        contention=monitor.note(),
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
