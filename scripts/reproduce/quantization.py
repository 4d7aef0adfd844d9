"""Post-training quantisation of a trained arithmetic LM: fp32/bf16 vs int8, int4 (groups 128/64/32) and 3-bit,
with RTN, AWQ and GPTQ: held-out loss/perplexity, greedy exact match by K, and weight bytes.

  python -m scripts.reproduce.quantization        (= --workdir=runs/quant_base --size=base --steps=800 --modulus=10)

RUNTIME on the shared 2-core CPU (load 5-13 from other agents, niced): LM training 39 min (800 steps, ~3-5 s/step;
cached in <workdir>/lm, rerunning resumes/reuses it), then ~2-3 min per row.  The LM is the `base` size
(d_model 256, 6 layers, 4.7M params) trained on the quickstart's mod-10 chains (K = 1..8, ops + - *): on this CPU a
useful mod-100 `base` model (configs/lm/arith.py, 10k steps) is out of reach, and base learns the mod-10 task to
~1.0 token accuracy in 800 steps.  Quantised weights run through the model as they are (`QuantizedWeight.matmul`,
impl "xla": dequantise + dot); projections (q/k/v/o, gate/up/down) are quantised, the embedding and lm_head stay
fp32.  Calibration for AWQ/GPTQ: --calib_tokens tokens of the *train* split; loss on the eval split; exact match on
held-out test problems.  "rtn-jitterS" rows: RTN of diag(s) W with random s ~ exp(0.1 N(0,1)), x / s at run time —
equally good roundings whose spread is the noise floor any method comparison has to clear.
Writes <workdir>/results/quantization.json and <workdir>/figures/quantization.png.

The base LM learns the task perfectly and no setting hurts it (docs/results/quantization.md).  Its second table is
a model the rounding does hurt: the `tiny` size (d_model 64, 2 layers, 0.1M params; eval token accuracy 0.967), made by
  python -m scripts.reproduce.quantization --workdir=runs/quant_tiny --size=tiny --steps=1500 --lr=0.01 \
    --problems_per_k=64 '--settings=int8,int4 g128,int4 g64,int4 g32,int3 g64,int3 g32,int2 g128,int2 g32' \
    '--jitter_setting=int4 g32,int3 g32'
(LM 16 min, then ~1 min per row on the shared CPU).  `--replot=<json>` redraws the figure from a results file.

An imported Hugging Face checkpoint instead of the arithmetic LM (`scripts/reproduce/quantization_hf.py`: calibration
on a local text file tokenized by the model's own tokenizer, scored by held-out loss/perplexity, logit error and
top-1 agreement against the float model, since exact match needs the arithmetic task):
  python -m scripts.reproduce.quantization --hf_path=tests/assets/hf/llama_nopad --text_file=README.md \
    --workdir=runs/quant_hf '--settings=int8,int4 g32,int3 g32' '--export_setting=int4 g32 gptq'"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import common
from experiments import train_lm
from framework import quant
from framework.models import lm
from framework.tasks import data, policy_eval
from framework.training import loop
from framework.training.loss import next_token_loss
from scripts.reproduce import quantization_hf

_WORKDIR = flags.DEFINE_string("workdir", "runs/quant_base", "Output directory.")
_LM_WORKDIR = flags.DEFINE_string("lm_workdir", None, "Where the LM is trained/cached (default: <workdir>/lm).")
_SIZE = flags.DEFINE_enum("size", "base", ["tiny", "small", "base"], "Model size (configs/common.MODEL_SIZES).")
_STEPS = flags.DEFINE_integer("steps", 800, "LM training steps (batch 32).")
_MODULUS = flags.DEFINE_integer("modulus", 10, "Task modulus: 10 (the quickstart's chains) or 100 (configs/lm/arith).")
_LR = flags.DEFINE_float("lr", 3e-3, "LM peak learning rate.")
_TRAIN_ONLY = flags.DEFINE_bool("train_only", False, "Train (or resume) the LM and stop.")
_EXTRA = flags.DEFINE_bool("extra_formats", False, "Also W8A8 (RTN) and NF4 (RTN, GPTQ).")
_JITTER = flags.DEFINE_integer("jitter_seeds", 3, "RTN repeats under random equivalent rescalings (noise floor).")
_JITTER_SIGMA = 0.1  # log-std of the random per-input-channel scale s: W' = diag(s) W quantised, x / s at run time
_PROBLEMS = flags.DEFINE_integer("problems_per_k", 32, "Held-out problems per K for exact match.")
_CALIB = flags.DEFINE_integer("calib_tokens", 4096, "Calibration tokens (train split) for AWQ/GPTQ.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Eval-split batches for perplexity.")

# (label, QuantConfig kwargs, methods); EXTRA runs with --extra_formats.
SETTINGS = [
    ("int8", dict(fmt="int8"), ("rtn",)),
    ("int4 g128", dict(fmt="int4", group_size=128), ("rtn", "awq", "gptq")),
    ("int4 g64", dict(fmt="int4", group_size=64), ("rtn", "awq", "gptq")),
    ("int4 g32", dict(fmt="int4", group_size=32), ("rtn", "awq", "gptq")),
    ("int3 g32", dict(fmt="int4", bits=3, group_size=32), ("rtn", "awq", "gptq")),
]
EXTRA = [
    ("int8 W8A8", dict(fmt="int8", act_quant=True), ("rtn",)),
    ("nf4 b64", dict(fmt="nf4"), ("rtn", "gptq")),
]
# Further rows, picked by name with --settings (low-bit stress rows).
MORE = [
    ("int3 g64", dict(fmt="int4", bits=3, group_size=64), ("rtn", "awq", "gptq")),
    ("int3 g128", dict(fmt="int4", bits=3, group_size=128), ("rtn", "awq", "gptq")),
    ("int2 g32", dict(fmt="int4", bits=2, group_size=32), ("rtn", "awq", "gptq")),
    ("int2 g128", dict(fmt="int4", bits=2, group_size=128), ("rtn", "awq", "gptq")),
]
_SETTINGS = flags.DEFINE_list(
    "settings",
    [label for label, _, _ in SETTINGS],
    "Rows to run, by label, among: " + ", ".join(label for label, _, _ in SETTINGS + EXTRA + MORE),
)
_REPLOT = flags.DEFINE_string(
    "replot",
    None,
    "Redraw <workdir>/figures/quantization.png and print the table from "
    "this results JSON; trains and quantises nothing.",
)
_HF_PATH = flags.DEFINE_string(
    "hf_path", None, "A local HF checkpoint folder to quantise instead of the arithmetic LM (needs --text_file)."
)
_TEXT_FILE = flags.DEFINE_string(
    "text_file",
    None,
    "Local plain-text file for --hf_path (token ids when the folder has no tokenizer.json): AWQ/GPTQ calibrate on "
    "its train rows, every setting is scored on its held-out rows (every tenth).",
)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per text-file row (--hf_path).")
_EXPORT = flags.DEFINE_string(
    "export_setting", None, "With --hf_path: '<setting> <method>' (e.g. 'int4 g32 gptq') to export as an HF folder."
)
_JITTER_AT = flags.DEFINE_list(
    "jitter_setting", ["int4 g128"], "The settings whose RTN gets the jitter (noise) rows (comma-separated labels)."
)


def _target_bytes(params, per_element: float) -> float:
    pattern = quant.DEFAULT_TARGETS
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(
        x.size * per_element for p, x in flat if re.fullmatch(pattern, "/".join(str(getattr(k, "key", k)) for k in p))
    )


def _eval_loss(params, model_cfg, batches) -> float:
    @jax.jit
    def scored(p, b):
        logits = lm.apply(
            p, b["tokens"], model_cfg, positions_BT=b.get("positions"), segment_ids_BT=b.get("segment_ids")
        )
        return next_token_loss(logits, b["tokens"], b["loss_mask"])[1]

    sums = [jax.device_get(scored(params, b)) for b in batches]
    return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums)


def _evaluate(params, model_cfg, lm_config, eval_batches) -> dict:
    kn = train_lm.knobs(lm_config)
    k_lo, k_hi = kn["num_steps"] if not isinstance(kn["num_steps"], int) else (kn["num_steps"],) * 2
    acc = policy_eval.accuracy_by_k(
        params, model_cfg, seed=lm_config.seed, ks=range(k_lo, k_hi + 1), problems_per_k=_PROBLEMS.value, knobs=kn
    )
    em = {k: v["exact_match"] for k, v in acc.items()}
    loss = _eval_loss(params, model_cfg, eval_batches)
    return {
        "eval_loss": loss,
        "perplexity": math.exp(loss),
        "exact_match_by_k": em,
        "exact_match_mean": float(np.mean(list(em.values()))),
    }


def _jittered_rtn(params, qcfg: quant.QuantConfig, model_cfg, seed: int):
    """RTN of diag(s) W with random s = exp(0.1 N(0, 1)) per input channel (x / s at run time): a quantisation as
    good as RTN in expectation, whose spread over seeds is the perplexity noise of "which rounding did we get"."""
    layout = quant.methods.linear_layout(model_cfg)
    rng = np.random.default_rng(seed)

    def one(path, w):
        name = quant.methods.path_str(path)
        if name not in layout or not re.fullmatch(qcfg.targets, name):
            return w
        n_in, n_stack = layout[name]
        K = int(np.prod(w.shape[n_stack : n_stack + n_in]))
        mats = np.asarray(w).reshape(-1, K, w.size // K // (int(np.prod(w.shape[:n_stack])) or 1))
        qws = []
        for m in mats:
            s = np.exp(_JITTER_SIGMA * rng.normal(size=K)).astype(np.float32)
            qw = quant.quantize_matrix(m * s[:, None], qcfg.fmt, bits=qcfg.bits, group_size=qcfg.group_size)
            qws.append(dataclasses.replace(qw, in_scale=jnp.asarray(1.0 / s)[None, :]))
        return quant.methods.qtensor.stack(qws) if n_stack else qws[0]

    return jax.tree_util.tree_map_with_path(one, params)


def _jitter_rows(params, model_cfg, record, label, kw):
    cfg = quant.QuantConfig(**kw)
    for seed in range(_JITTER.value):
        t0 = time.perf_counter()
        qp = _jittered_rtn(params, cfg, model_cfg, seed)
        wb = quant.weight_bytes(qp)
        record(label, f"rtn-jitter{seed}", qp, wb["storage"], wb["ideal"], time.perf_counter() - t0)


def lm_experiment_config(size: str, steps: int, modulus: int, lr: float):
    """The train_lm config of the studied LM: `size` on K = 1..8 chains mod `modulus`, batch 32, `steps` steps."""
    if modulus not in (10, 100):
        raise ValueError(f"--modulus={modulus}: expected 10 or 100")
    config = common.mod10_lm(size=size, steps=steps, lr=lr, checkpoint_every=100, log_every=50)  # the shared recipe
    if modulus == 100:  # the same LM and batch on two-digit chains (longer examples)
        config.task.modulus, config.train.seq_len = 100, 112
    config.lock()
    return config


def main(argv):
    del argv
    workdir = _WORKDIR.value
    if _REPLOT.value:
        with open(_REPLOT.value) as f:
            out = json.load(f)
        os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
        _plot(
            out["rows"],
            os.path.join(workdir, "figures", "quantization.png"),
            "Post-training quantisation: " + out["lm"],
        )
        print(table(out["rows"]))
        return
    if _HF_PATH.value:
        return _imported(workdir)
    lm_config = lm_experiment_config(_SIZE.value, _STEPS.value, _MODULUS.value, _LR.value)
    model_cfg, task = train_lm.make_task(lm_config)
    lm_dir = _LM_WORKDIR.value or os.path.join(workdir, "lm")
    t0 = time.perf_counter()
    params = jax.device_get(loop.train(lm_config, lm_dir, task).params)
    print(f"LM {_SIZE.value} mod {_MODULUS.value}, {_STEPS.value} steps: ready in {time.perf_counter() - t0:.0f}s")
    if _TRAIN_ONLY.value:
        return

    tc = lm_config.train
    eval_ds = data.make_dataset(
        seed=lm_config.seed,
        batch_size=tc.batch_size,
        seq_len=tc.seq_len,
        loss_on=lm_config.task.loss_on,
        split="eval",
        num_batches=_EVAL_BATCHES.value,
        **train_lm.knobs(lm_config),
    )
    eval_batches = [{k: np.asarray(b[k]) for k in ("tokens", "loss_mask")} for b in eval_ds]
    calib_ds = data.make_dataset(
        seed=lm_config.seed,
        batch_size=tc.batch_size,
        seq_len=tc.seq_len,
        loss_on=lm_config.task.loss_on,
        split="train",
        pack=True,
        num_batches=-(-_CALIB.value // (tc.batch_size * tc.seq_len)),
        **train_lm.knobs(lm_config),
    )
    calib = [{k: np.asarray(b[k]) for k in ("tokens", "positions", "segment_ids")} for b in calib_ds]

    rows = []
    lm_metrics = _last_train_metrics(lm_dir)

    def record(label, method, p, bytes_storage, bytes_ideal, seconds):
        r = dict(
            setting=label,
            method=method,
            weight_bytes=bytes_storage,
            weight_bytes_ideal=bytes_ideal,
            quantize_seconds=seconds,
            **_evaluate(p, model_cfg, lm_config, eval_batches),
        )
        rows.append(r)
        os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
        with open(os.path.join(workdir, "results", "quantization_partial.json"), "w") as f:
            json.dump(rows, f, indent=1)
        print(
            f"{label:10s} {method:5s} loss {r['eval_loss']:.3e} ppl {r['perplexity']:.4f} "
            f"EM {r['exact_match_mean']:.3f} "
            f"bytes {bytes_storage:,.0f} ({seconds:.1f}s)",
            flush=True,
        )

    record("fp32", "-", params, _target_bytes(params, 4), _target_bytes(params, 4), 0.0)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    record("bf16", "-", bf16, _target_bytes(params, 2), _target_bytes(params, 2), 0.0)
    chosen = _chosen_settings()
    stray = [label for label in _JITTER_AT.value if label not in _SETTINGS.value]
    if stray:
        raise ValueError(f"--jitter_setting: {stray} not among --settings {_SETTINGS.value}")
    for label, kw, methods in chosen:
        for method in methods:
            t0 = time.perf_counter()
            qp = quant.quantize(params, quant.QuantConfig(**kw), method, calib, model_cfg=model_cfg)
            wb = quant.weight_bytes(qp)
            record(label, method, qp, wb["storage"], wb["ideal"], time.perf_counter() - t0)
        if label in _JITTER_AT.value:  # the noise floor of RTN's rounding luck, next to the rows it qualifies
            _jitter_rows(params, model_cfg, record, label, kw)

    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    out = {
        "lm": f"{_SIZE.value} ({lm_config.model.d_model}-wide, {lm_config.model.n_layers} layers), K = 1..8 chains "
        f"mod {_MODULUS.value}, {_STEPS.value} steps of batch {lm_config.train.batch_size} x {lm_config.train.seq_len}",
        "lm_final_train_metrics": lm_metrics,
        "command": "python -m scripts.reproduce.quantization " + " ".join(argv_flags()),
        "model": model_cfg.to_dict(),
        "calib_tokens": _CALIB.value,
        "problems_per_k": _PROBLEMS.value,
        "rows": rows,
    }
    with open(os.path.join(workdir, "results", "quantization.json"), "w") as f:
        json.dump(out, f, indent=1)
    _plot(rows, os.path.join(workdir, "figures", "quantization.png"), "Post-training quantisation: " + out["lm"])
    print(table(rows))


def _chosen_settings():
    known = {label: (kw, methods) for label, kw, methods in SETTINGS + EXTRA + MORE}
    unknown = [label for label in _SETTINGS.value if label not in known]
    if unknown:
        raise ValueError(f"--settings: unknown {unknown}; expected among {list(known)}")
    chosen = [(label, *known[label]) for label in _SETTINGS.value]
    return chosen + [row for row in EXTRA if _EXTRA.value and row[0] not in _SETTINGS.value]


def _imported(workdir: str) -> None:
    """The study on an imported checkpoint (--hf_path), scored on --text_file (quantization_hf)."""
    if not _TEXT_FILE.value:
        raise ValueError("--hf_path needs --text_file: a local plain-text file to calibrate on and score with")
    out = quantization_hf.run(
        _HF_PATH.value,
        _TEXT_FILE.value,
        workdir,
        settings=_chosen_settings(),
        seq_len=_SEQ_LEN.value,
        calib_tokens=_CALIB.value,
        eval_rows=_EVAL_BATCHES.value * quantization_hf.ROWS_PER_BATCH,
        export_setting=_EXPORT.value,
    )
    names = ("workdir", "hf_path", "text_file", "seq_len", "calib_tokens", "eval_batches", "export_setting")
    out["command"] = "python -m scripts.reproduce.quantization " + " ".join(
        [f"'--{n}={flags.FLAGS[n].value}'" for n in names if flags.FLAGS[n].value is not None]
        + [f"'--settings={','.join(_SETTINGS.value)}'"]
    )
    for sub in ("results", "figures"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    with open(os.path.join(workdir, "results", "quantization.json"), "w") as f:
        json.dump(out, f, indent=1)
    right = ("top1_agreement", "top-1 agreement with the fp32 model (held-out text)")
    title = "Post-training quantisation: " + out["lm"]
    _plot(out["rows"], os.path.join(workdir, "figures", "quantization.png"), title, right)
    print(quantization_hf.table(out["rows"]))


def argv_flags() -> list[str]:
    names = ("workdir", "lm_workdir", "size", "steps", "modulus", "lr", "jitter_seeds", "problems_per_k")
    names += ("calib_tokens", "eval_batches", "extra_formats")
    return [f"--{n}={flags.FLAGS[n].value}" for n in names if flags.FLAGS[n].value is not None] + [
        f"'--{n}={','.join(flags.FLAGS[n].value)}'" for n in ("settings", "jitter_setting")
    ]


def _last_train_metrics(lm_dir: str) -> dict:
    """The last logged training-loss line of the LM's metrics.jsonl (empty when none was written)."""
    path = os.path.join(lm_dir, "metrics.jsonl")
    last = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if "loss" in rec or "train/loss" in rec:
                    last = rec
    return last


def table(rows) -> str:
    """The results table (docs/results/quantization.md): one line per (setting, method)."""
    ks = sorted(rows[0]["exact_match_by_k"], key=int)
    head = (
        "| setting | method | eval loss (nats/token) | ppl | EM mean | "
        + " | ".join(f"K={k}" for k in ks)
        + " | bytes (held) | bytes (nominal) |"
    )
    lines = [head, "|" + "---|" * (7 + len(ks))]
    for r in rows:
        em = " | ".join(f"{r['exact_match_by_k'][k]:.2f}" for k in ks)
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['eval_loss']:.2e} | {r['perplexity']:.4f} | "
            f"{r['exact_match_mean']:.3f} | {em} | "
            f"{r['weight_bytes'] / 1024:.1f} KiB | {r['weight_bytes_ideal'] / 1024:.1f} KiB |"
        )
    return "\n".join(lines)


def _plot(rows, path, title, right=("exact_match_mean", "greedy exact match (mean over K)")):
    """Left: held-out loss per setting (log), one line per method, jittered RTN as orange crosses, float as dashed
    lines; right: `right` (key, label; default mean greedy exact match), the same way.  Settings left to right in
    the order they ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantised = [r for r in rows if r["method"] != "-"]
    order = list(dict.fromkeys(r["setting"] for r in quantised))  # as run (--settings order)
    x = {s: i for i, s in enumerate(order)}
    colors = {"rtn": "tab:red", "awq": "tab:blue", "gptq": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, ylabel in (
        (axes[0], "eval_loss", "held-out loss, nats/token (log scale)"),
        (axes[1], *right),
    ):
        for r in rows:
            if r["method"] == "-":
                ax.axhline(r[key], ls="--" if r["setting"] == "fp32" else ":", color="gray", label=r["setting"])
        for m, c in colors.items():
            pts = sorted((x[r["setting"]], r[key]) for r in quantised if r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), "o-", color=c, label=m)
        jit = [(x[r["setting"]], r[key]) for r in quantised if r["method"].startswith("rtn-jitter")]
        if jit:
            ax.scatter(*zip(*jit), marker="x", color="tab:orange", zorder=3, label="rtn, random rescaling (noise)")
        ax.set_xticks(range(len(order)), order, rotation=30, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app.run(main)
