"""Post-training quantisation of an imported Hugging Face checkpoint, calibrated and scored on a local text file.

Glossary: B rows per batch, T tokens per row (--seq_len), V vocab.

  python -m scripts.reproduce.quantization --hf_path=<folder> --text_file=<file> --workdir=runs/quant_hf

The arithmetic study's exact match needs a model trained on the arithmetic task, so an imported model is scored on
the text instead. The file is tokenized by the folder's tokenizer.json (whitespace-separated token ids when it has
none) and cut into rows of T tokens (`hf.text_rows`: [BOS] + T - 1 tokens where the model has a BOS); every tenth
row is held out. AWQ/GPTQ calibrate on the train rows (every position of a row is a real token: `mask` all ones,
so nothing but padding could be dropped and there is none); each setting is scored on the held-out rows by
  - held-out loss and perplexity (next-token cross-entropy over every position after the first),
  - logit error against the float model: max and mean |logits - fp32 logits| over the same positions,
  - top-1 agreement: the fraction of positions where the quantised model's argmax equals the float model's.
Writes <workdir>/results/quantization.json (the rows, the metric names, the file's token counts) and
<workdir>/figures/quantization.png; with --export_setting="<label> <method>" also an HF folder of that quantised
model (dequantised, `hf.save_hf_checkpoint(source=...)`) in <workdir>/export.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from framework import quant
from framework.models import hf, lm
from framework.training.loss import next_token_loss

ROWS_PER_BATCH = 8
METRICS = {
    "eval_loss": "held-out next-token loss on the text file (nats/token)",
    "perplexity": "exp(eval_loss)",
    "logit_max_abs_err": "max |logits - fp32 logits| over held-out positions",
    "logit_mean_abs_err": "mean |logits - fp32 logits| over held-out positions and the vocabulary",
    "top1_agreement": "fraction of held-out positions whose argmax equals the fp32 model's",
}


def text_batches(rows_RT: np.ndarray, n_rows: int | None = None) -> list[dict[str, np.ndarray]]:
    """Batches of up to ROWS_PER_BATCH rows: tokens, mask (every position real) and loss_mask (every target)."""
    rows_RT = rows_RT if n_rows is None else rows_RT[:n_rows]
    out = []
    for start in range(0, len(rows_RT), ROWS_PER_BATCH):
        tokens = rows_RT[start : start + ROWS_PER_BATCH]
        loss_mask = np.ones(tokens.shape, np.float32)
        loss_mask[:, 0] = 0.0  # position 0 is no target: nothing precedes it
        out.append({"tokens": tokens, "mask": np.ones(tokens.shape, bool), "loss_mask": loss_mask})
    return out


def make_scorer(model_cfg: lm.LMConfig):
    """`score(params, ref_params, batch) -> sums`: loss and logit-error sums of `params` against `ref_params`."""

    @jax.jit
    def score(params, ref_params, batch):
        logits_BTV = lm.apply(params, batch["tokens"], model_cfg).astype(jnp.float32)
        ref_BTV = lm.apply(ref_params, batch["tokens"], model_cfg).astype(jnp.float32)
        _, aux = next_token_loss(logits_BTV, batch["tokens"], batch["loss_mask"])
        # Logits at t predict token t + 1: the positions scored are those whose next token is a target.
        scored_BT = jnp.concatenate([batch["loss_mask"][:, 1:], jnp.zeros_like(batch["loss_mask"][:, :1])], axis=1)
        err_BTV = jnp.abs(logits_BTV - ref_BTV) * scored_BT[..., None]
        agree_BT = (jnp.argmax(logits_BTV, -1) == jnp.argmax(ref_BTV, -1)) * scored_BT
        return dict(
            loss_sum=aux["loss_sum"],
            tokens=aux["tokens"],
            err_max=err_BTV.max(),
            err_sum=err_BTV.sum(),
            agree=agree_BT.sum(),
            positions=scored_BT.sum(),
        )

    return score


def evaluate(score, params, ref_params, batches, vocab_size: int) -> dict[str, float]:
    """The METRICS of `params` on held-out `batches` (the float model `ref_params` is the logit reference)."""
    sums = [jax.device_get(score(params, ref_params, b)) for b in batches]
    total = lambda k: sum(float(s[k]) for s in sums)  # noqa: E731
    loss = total("loss_sum") / total("tokens")
    return dict(
        eval_loss=loss,
        perplexity=math.exp(loss),
        logit_max_abs_err=max(float(s["err_max"]) for s in sums),
        logit_mean_abs_err=total("err_sum") / (total("positions") * vocab_size),
        top1_agreement=total("agree") / total("positions"),
    )


def run(
    hf_path: str,
    text_file: str,
    workdir: str,
    *,
    settings,
    seq_len: int,
    calib_tokens: int,
    eval_rows: int,
    export_setting: str | None = None,
) -> dict:
    """Quantises the checkpoint at `hf_path` with every (label, QuantConfig kwargs, methods) of `settings`; returns
    (and writes) the results dict. `eval_rows` caps the held-out rows scored; `calib_tokens` the calibration rows."""
    t0 = time.perf_counter()
    model_cfg, params, _ = hf.model_from_config({"hf_path": hf_path})
    key = "--text_file"
    ids = hf.text_file_ids(text_file, hf_path, model_cfg, key=key)
    if not 2 <= seq_len <= model_cfg.max_seq_len:
        raise ValueError(
            f"--seq_len={seq_len}: expected 2 <= seq_len <= the model's max_seq_len {model_cfg.max_seq_len}"
        )
    train_RT = hf.text_rows(ids, seq_len, model_cfg.bos_id, "train", key=key)
    eval_RT = hf.text_rows(ids, seq_len, model_cfg.bos_id, "eval", key=key)
    calib = text_batches(train_RT, -(-calib_tokens // seq_len))
    held_out = text_batches(eval_RT, eval_rows)
    labels = [f"{label} {m}" for label, _, methods in settings for m in methods]
    if export_setting is not None and export_setting not in labels:
        raise ValueError(f"--export_setting={export_setting!r}: expected one of {labels}")
    score = make_scorer(model_cfg)
    rows, exported = [], None

    def record(label, method, p, bytes_storage, bytes_ideal, seconds):
        r = dict(setting=label, method=method, weight_bytes=bytes_storage, weight_bytes_ideal=bytes_ideal)
        r.update(quantize_seconds=seconds, **evaluate(score, p, params, held_out, model_cfg.vocab_size))
        rows.append(r)
        print(
            f"{label:10s} {method:5s} loss {r['eval_loss']:.4f} ppl {r['perplexity']:.3f} "
            f"|dlogit| max {r['logit_max_abs_err']:.3g} mean {r['logit_mean_abs_err']:.3g} "
            f"top-1 {r['top1_agreement']:.3f} ({seconds:.1f}s)",
            flush=True,
        )

    n_target = _target_elements(params)
    record("fp32", "-", params, 4 * n_target, 4 * n_target, 0.0)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    record("bf16", "-", bf16, 2 * n_target, 2 * n_target, 0.0)
    for label, kw, methods in settings:
        for method in methods:
            t1 = time.perf_counter()
            qp = quant.quantize(params, quant.QuantConfig(**kw), method, calib, model_cfg=model_cfg)
            wb = quant.weight_bytes(qp)
            record(label, method, qp, wb["storage"], wb["ideal"], time.perf_counter() - t1)
            if export_setting == f"{label} {method}":
                exported = str(hf.save_hf_checkpoint(qp, model_cfg, os.path.join(workdir, "export"), source=hf_path))
    out = dict(
        lm=f"{os.path.basename(os.path.normpath(hf_path))} ({model_cfg.d_model}-wide, {model_cfg.n_layers} layers, "
        f"vocab {model_cfg.vocab_size})",
        hf_path=hf_path,
        text_file=text_file,
        text_tokens=int(len(ids)),
        seq_len=seq_len,
        calib_tokens=int(sum(b["tokens"].size for b in calib)),
        eval_tokens=int(sum(b["tokens"].size for b in held_out)),
        metrics=METRICS,
        model=model_cfg.to_dict(),
        rows=rows,
        exported=exported,
        seconds=time.perf_counter() - t0,
    )
    return out


def _target_elements(params) -> int:
    """Number of weights `quant.DEFAULT_TARGETS` names (what the float rows' byte counts are made of)."""
    import re

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(x.size for p, x in flat if re.fullmatch(quant.DEFAULT_TARGETS, quant.methods.path_str(p)))


def table(rows) -> str:
    """The imported-model results table: one line per (setting, method)."""
    lines = [
        "| setting | method | held-out loss | ppl | max abs logit err | mean abs logit err | top-1 agreement | "
        "bytes (held) | bytes (nominal) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['eval_loss']:.4f} | {r['perplexity']:.3f} | "
            f"{r['logit_max_abs_err']:.2e} | {r['logit_mean_abs_err']:.2e} | {r['top1_agreement']:.3f} | "
            f"{r['weight_bytes'] / 1024:.1f} KiB | {r['weight_bytes_ideal'] / 1024:.1f} KiB |"
        )
    return "\n".join(lines)
