"""LoRA adaptation of an imported Hugging Face checkpoint on a local text file, merged and exported back to HF.

Glossary: B batch rows, T tokens per row (--seq_len), R rows of the file.

  python -m scripts.reproduce.lora --hf_path=<folder> --text_file=<file> --workdir=runs/lora_hf \\
      --methods=lora,dora --ranks=4 --lrs=1e-2 --seeds=0 --steps=50

The file is tokenized by the folder's tokenizer.json (whitespace-separated token ids when it has none) and cut into
rows of T tokens (`hf.text_rows`); every tenth row is held out. Each (method, rank, LR, seed) trains on the one
loop (`peft.adapter_task` over the next-token loss of every position after the first: `training.loss.lm_loss_fn`)
in <workdir>/runs/<name> (rerunning restores finished runs), then its adapters are merged (`peft.merge`) and scored
by the held-out loss. The run with the lowest held-out loss is exported with `hf.save_hf_checkpoint(merged,
source=--hf_path)` to <workdir>/export (config.json written back field for field, the tokenizer copied) and read
back with `hf.load_hf_checkpoint`; the largest |logit| difference between the exported and the merged model is
recorded. Writes <workdir>/results/lora_hf.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
import optax

from configs import common
from framework import peft
from framework.models import hf, lm
from framework.training import loop
from framework.training.loss import lm_loss_fn
from framework.training.metrics import read_metrics
from scripts.reproduce import quantization_hf

BATCH_SIZE = 8


def text_task(model_cfg: lm.LMConfig, params, train_RT: np.ndarray, *, seed: int, batch_size: int) -> loop.Task:
    """A `loop.Task` training `params` by next-token loss on the rows `train_RT`: batch i holds `batch_size` rows drawn
    without replacement by `default_rng([seed, i])` (a pure function of the step, so a resumed run is exact)."""
    T = train_RT.shape[1]

    def batches(start, rows=None):
        step = start
        while True:
            pick = np.random.default_rng([seed, step]).choice(len(train_RT), batch_size, len(train_RT) < batch_size)
            b = _one_batch(train_RT[pick])
            yield b if rows is None else {k: v[rows[0] : rows[1]] for k, v in b.items()}
            step += 1

    return loop.Task(
        init_params=lambda rng: params,
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=lm_loss_fn(model_cfg),
        batches=batches,
        flops_per_example=lm.flops_per_token(model_cfg, T) * T,
    )


def _one_batch(tokens_BT: np.ndarray) -> dict[str, np.ndarray]:
    """tokens and loss_mask (every position after the first is a target) of a batch of rows."""
    loss_mask = np.ones(tokens_BT.shape, np.float32)
    loss_mask[:, 0] = 0.0
    return {"tokens": tokens_BT, "loss_mask": loss_mask}


def loop_config(*, seed: int, steps: int, lr: float, seq_len: int, batch_size: int) -> ml_collections.ConfigDict:
    """The loop's config of one run: `steps` steps, every step logged, one checkpoint at the end, data parallel."""
    return ml_collections.ConfigDict(
        dict(
            seed=seed,
            train=common.train_config(
                steps=steps,
                batch_size=batch_size,
                seq_len=seq_len,
                lr=lr,
                warmup_steps=min(20, steps // 5),
                log_every=1,
                checkpoint_every=steps,
                keep_checkpoints=1,
                progress=False,
            ),
            mesh=common.mesh_config(),
        )
    )


def eval_loss(params, model_cfg: lm.LMConfig, batches) -> float:
    """Mean next-token loss (nats/token) of `params` over held-out `batches`."""
    scored = jax.jit(lambda p, b: lm_loss_fn(model_cfg)(p, b)[1])
    sums = [jax.device_get(scored(params, {k: b[k] for k in ("tokens", "loss_mask")})) for b in batches]
    return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums)


def run(
    hf_path: str,
    text_file: str,
    workdir: str,
    *,
    methods,
    ranks,
    lrs,
    seeds,
    steps: int,
    seq_len: int,
    variants,
    schedule,
    export: bool = True,
) -> dict:
    """Adapts the checkpoint at `hf_path` with every method x rank x LR x seed; exports the best merged model.

    `variants`: method -> `peft.LoraConfig` kwargs (the study's VARIANTS; "full" = full fine-tuning, "lora+" = LoRA
    with `peft.lora_plus`); `schedule(lr, steps)` the study's LR schedule. Returns (and writes) the results dict.
    """
    t0 = time.process_time()
    model_cfg, base, _ = hf.model_from_config({"hf_path": hf_path})
    key = "--text_file"
    if not 2 <= seq_len <= model_cfg.max_seq_len:
        raise ValueError(
            f"--seq_len={seq_len}: expected 2 <= seq_len <= the model's max_seq_len {model_cfg.max_seq_len}"
        )
    ids = hf.text_file_ids(text_file, hf_path, model_cfg, key=key)
    train_RT = hf.text_rows(ids, seq_len, model_cfg.bos_id, "train", key=key)
    held_out = quantization_hf.text_batches(hf.text_rows(ids, seq_len, model_cfg.bos_id, "eval", key=key))
    unknown = sorted(set(methods) - {"full", *variants})
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected among full, {', '.join(variants)}")
    base_loss = eval_loss(base, model_cfg, held_out)
    print(f"base: held-out loss {base_loss:.4f} on {len(ids)} tokens of {text_file}", flush=True)
    rows, best = [], None
    for method in methods:
        for rank in [None] if method == "full" else ranks:
            for lr in lrs:
                for seed in seeds:
                    name = f"{method}{'' if rank is None else f'_r{rank}'}_lr{lr:.6g}_s{seed}_{steps}steps"
                    config = loop_config(seed=seed, steps=steps, lr=lr, seq_len=seq_len, batch_size=BATCH_SIZE)
                    task = text_task(model_cfg, base, train_RT, seed=seed, batch_size=BATCH_SIZE)
                    sched = schedule(lr, steps)
                    if method == "full":
                        task = dataclasses.replace(task, optimizer=optax.adamw(sched, weight_decay=0.0))
                        finish, n_train = (lambda p: p), peft.count_params(base)
                    else:
                        lcfg = peft.LoraConfig(rank=rank, alpha=2.0 * rank, **variants[method])
                        adapted = peft.add_adapters(base, lcfg, jax.random.key(seed), model_cfg=model_cfg)
                        tx = peft.lora_plus(sched, 16.0) if method == "lora+" else optax.adamw(sched, weight_decay=0.0)
                        task = peft.adapter_task(task, adapted, optimizer=tx, lr_schedule=sched)
                        finish = lambda p, a=adapted: peft.merge(peft.set_adapters(a, p))  # noqa: E731
                        n_train = peft.count_params(peft.adapter_params(adapted))
                    run_dir = os.path.join(workdir, "runs", name)
                    merged = finish(jax.device_get(loop.train(config, run_dir, task).params))
                    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
                    row = dict(
                        method=method,
                        rank=rank,
                        lr=lr,
                        seed=seed,
                        trainable_params=n_train,
                        train_loss_first=losses[0],
                        train_loss_last=losses[-1],
                        eval_loss=eval_loss(merged, model_cfg, held_out),
                    )
                    rows.append(row)
                    print(f"{name}: train loss {losses[0]:.4f} -> {losses[-1]:.4f}, held-out {row['eval_loss']:.4f}")
                    if best is None or row["eval_loss"] < best[0]["eval_loss"]:
                        best = (row, merged)
    out = dict(
        hf_path=hf_path,
        text_file=text_file,
        text_tokens=int(len(ids)),
        seq_len=seq_len,
        steps=steps,
        batch_size=BATCH_SIZE,
        base_eval_loss=base_loss,
        rows=rows,
    )
    if export and best is not None:
        folder = hf.save_hf_checkpoint(best[1], model_cfg, os.path.join(workdir, "export"), source=hf_path)
        cfg2, params2 = hf.load_hf_checkpoint(folder)
        tokens = held_out[0]["tokens"]
        diff = np.abs(np.asarray(lm.apply(params2, tokens, cfg2)) - np.asarray(lm.apply(best[1], tokens, model_cfg)))
        out["export"] = dict(folder=str(folder), run=best[0], reloaded_max_abs_logit_diff=float(diff.max()))
        print(f"exported the best run to {folder}: reloaded logits within {diff.max():.2e} of the merged model")
    out["process_cpu_seconds"] = time.process_time() - t0
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    with open(os.path.join(workdir, "results", "lora_hf.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(table(out))
    return out


def table(out) -> str:
    """One line per run: method, rank, LR, seed, trainable params, train loss first -> last, held-out loss."""
    lines = [
        "| method | rank | LR | seed | trainable params | train loss (first -> last) | held-out loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['method']} | {r['rank'] or '-'} | {r['lr']:.0e} | {r['seed']} | {r['trainable_params']:,} | "
            f"{r['train_loss_first']:.4f} -> {r['train_loss_last']:.4f} | {r['eval_loss']:.4f} |"
        )
    lines.append(f"| base (no adaptation) | - | - | - | 0 | - | {out['base_eval_loss']:.4f} |")
    return "\n".join(lines)
