"""Train a VLM on rendered arithmetic expressions in stages through the one loop, and measure reading and answering.

Stages (each a `loop.Task` on `loop.train`, in its own workdir subfolder, resumable; a stage with steps=0 is skipped):
  pretrain  the LM alone on the text version of the task ("read:" -> "2+4", "value:" -> "6"), the expression given
            as text: with task.text_layout="grid" each image cell's character as a token where the image tokens go
            (the image as text: needs task.cell = the patch size), with "prompt" after the prompt ("value:2+4");
            the "pretrained LM" LLaVA and PaliGemma start from;
  stage1    read the expression from the image ("read:" -> "23+45"); trains the groups in `stage1.train`
            (default the projector, as LLaVA's stage 1; add "vision" to train the encoder too);
  stage2    both prompts ("mixed"), the answer being the chain's value; trains `stage2.train` (default projector + LM).
Groups not trained in a stage are frozen by the loop's optimiser labels (`vlm.param_groups`): bitwise unchanged.

Artifacts in `workdir`: <stage>/{config.json, metrics.jsonl, checkpoints/}, results/vlm.json (reading accuracy per
character and per expression after stages 1 and 2, exact match of the answer by K after stage 2),
figures/samples.png (rendered eval images with the model's readings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from configs.vlm import common as vlm_common
from framework import config as config_lib
from framework import sharding
from framework.models import vlm
from framework.tasks import arithmetic, render
from framework.tasks.data import split_seed
from framework.training import loop

log = logging.getLogger(__name__)
STAGES = ("pretrain", "stage1", "stage2")


def model_config(config: ml_collections.ConfigDict) -> vlm.VLMConfig:
    m = config.model
    return vlm.VLMConfig(
        vision=m.vision.to_dict(),
        lm=m.lm.to_dict(),
        projector=m.projector,
        image_token_id=m.image_token_id,
        prefix_lm=m.prefix_lm,
    )


def make_task(config: ml_collections.ConfigDict, mode: str, *, text: bool = False) -> render.VLMTask:
    """The rendered-expression task of `config.task` in `mode` ("read", "compute", "mixed")."""
    t, cfg = config.task, model_config(config)
    return render.VLMTask(
        num_image_tokens=cfg.num_image_tokens,
        mode=mode,
        knobs=dict(num_steps=tuple(t.num_steps), ops=t.ops, modulus=t.modulus),
        render=dict(
            height=cfg.vision.image_height,
            width=cfg.vision.image_width,
            scale=tuple(t.scale),
            jitter=t.jitter,
            noise=t.noise,
            distractors=t.distractors,
            cell=t.cell,
            line_jitter=t.line_jitter,
        ),
        text=text,
        layout=t.text_layout if text else "prompt",
    )


def validate(config: ml_collections.ConfigDict) -> vlm.VLMConfig:
    """Checks keys, types and combinations of a vlm config; returns the model config. Compiles nothing."""
    config_lib.check_against(config, vlm_common.vlm_experiment())
    try:
        cfg = model_config(config)
        tasks = [make_task(config, config[s].mode, text=s == "pretrain") for s in STAGES]
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(str(e)) from None
    req = config_lib.require
    req(cfg.image_token_id == render.IMAGE_TOKEN_ID, "model.image_token_id", f"must be {render.IMAGE_TOKEN_ID}")
    req(cfg.lm.vocab_size > render.IMAGE_TOKEN_ID, "model.lm.vocab_size", f"must exceed {render.IMAGE_TOKEN_ID}")
    longest = max(t.seq_len() for t in tasks)
    req(longest <= cfg.lm.max_seq_len, "model.lm.max_seq_len", f"{cfg.lm.max_seq_len} < longest row ({longest})")
    for s in STAGES:
        sc = config[s]
        req(sc.steps >= 0, f"{s}.steps", f"must be >= 0, got {sc.steps}")
        bad = [g for g in sc.train if g not in vlm.GROUPS]
        req(not bad and len(sc.train) > 0, f"{s}.train", f"groups {tuple(sc.train)} must be some of {vlm.GROUPS}")
        req(sc.mode in render.MODES, f"{s}.mode", f"must be one of {render.MODES}")
    req(tuple(config.pretrain.train) == ("lm",), "pretrain.train", "the text-only stage trains ('lm',) alone")
    shape = sharding.mesh_shape(config.mesh)
    split = shape[0] * shape[1]
    req(config.train.batch_size % split == 0, "train.batch_size", f"must be divisible by mesh data*fsdp = {split}")
    return cfg


def _stage_config(config, stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.steps = config[stage].steps
    c.train.lr = config[stage].lr
    return c


def train_stage(config, stage: str, params, workdir: str):
    """Trains `params` for one stage (the groups of `config.<stage>.train`, the rest frozen); returns new params."""
    cfg = model_config(config)
    text = stage == "pretrain"
    task = make_task(config, config[stage].mode, text=text)
    ds = render.make_vlm_dataset(task, seed=config.seed + STAGES.index(stage), batch_size=config.train.batch_size)
    keys = ("tokens", "loss_mask", "prefix_len") + (() if text else ("images",))

    def batches(start, rows=None):
        for i in range(start, len(ds)):
            b = ds[i]
            yield {k: b[k] if rows is None else b[k][rows[0] : rows[1]] for k in keys}

    trained = tuple(config[stage].train)
    loop_task = loop.Task(
        init_params=lambda rng: params,
        logical_axes=vlm.logical_axes(cfg),
        loss_fn=vlm.loss_fn(cfg),
        batches=batches,
        flops_per_example=vlm.flops_per_example(cfg, task.seq_len()),
        param_labels=vlm.param_groups,
        label_settings={g: None for g in vlm.GROUPS if g not in trained},
    )
    state = loop.train(_stage_config(config, stage), os.path.join(workdir, stage), loop_task)
    return jax.device_get(state.params)


def evaluate(params, cfg: vlm.VLMConfig, task: render.VLMTask, *, seed: int, n: int, batch_size: int) -> dict:
    """Greedy answers on `n` held-out examples per K: reading accuracy (chars, whole) or answer exact match by K."""
    out: dict = {}
    lo, hi = task.knobs.steps_range
    # One length for every K and prompt (the longest reading, plus EOS): one compiled generate serves them all.
    max_new = hi * (1 + arithmetic.number_width(task.knobs.modulus)) + arithmetic.number_width(task.knobs.modulus) + 1
    for k in range(lo, hi + 1):
        kt = dataclasses.replace(task, knobs=arithmetic.make_knobs(**{**task.knobs.as_kwargs(), "num_steps": k}))
        exs = [kt.example(split_seed(seed, "test"), i) for i in range(n)]
        got = []
        for i in range(0, n, batch_size):
            chunk = exs[i : i + batch_size]
            res = vlm.generate(
                params,
                cfg,
                np.stack([e["image"] for e in chunk]),
                [kt.prompt_ids(e["prompt"]) for e in chunk],
                max_new_tokens=max_new,
            )
            got += render.VLM_TOKENIZER.decode_batch(np.asarray(res.tokens))
        want = [e["completion"] for e in exs]
        chars = [sum(a == b for a, b in zip(g, w)) / max(len(w), len(g)) for g, w in zip(got, want)]
        out[k] = {
            "exact": float(np.mean([g == w for g, w in zip(got, want)])),
            "char_accuracy": float(np.mean(chars)),
            "n": n,
            "samples": [[w, g] for w, g in zip(want[:6], got[:6])],
        }
    return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the stages (resuming from `workdir`), evaluates, writes artifacts; returns results (and params)."""
    cfg = validate(config)
    params = vlm.init(cfg, jax.random.key(config.seed))
    results: dict = {"stages": {}}
    ev = dict(seed=config.seed, n=config.eval.problems_per_k, batch_size=config.eval.batch_size)
    for stage in STAGES:
        if config[stage].steps == 0:
            continue
        params = train_stage(config, stage, params, workdir)
        if stage != "pretrain":
            results["stages"][stage] = {
                "read": evaluate(params, cfg, make_task(config, "read"), **ev),
                **({"compute": evaluate(params, cfg, make_task(config, "compute"), **ev)} if stage == "stage2" else {}),
            }
    if jax.process_index() == 0:
        _write_artifacts(workdir, config, results)
        for stage, by_mode in results["stages"].items():
            for mode, by_k in by_mode.items():
                cells = ", ".join(
                    f"K={k}: chars {r['char_accuracy']:.2f} exact {r['exact']:.2f}" for k, r in by_k.items()
                )
                print(f"{stage} {mode}: {cells}")
    return dict(results, params=params, cfg=cfg)


def _write_artifacts(workdir: str, config, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    with open(os.path.join(workdir, "results", "vlm.json"), "w") as f:
        json.dump(results, f, indent=2)
    stages = results["stages"]
    if not stages:
        return
    lo = min(config.task.num_steps)
    task = make_task(config, "read")
    task = dataclasses.replace(task, knobs=arithmetic.make_knobs(**{**task.knobs.as_kwargs(), "num_steps": lo}))
    samples = list(stages.values())[-1]["read"][lo]["samples"]
    fig, axes = plt.subplots(2, 3, figsize=(9, 3))
    for i, (ax, (want, got)) in enumerate(zip(axes.flat, samples)):
        ax.imshow(task.example(split_seed(config.seed, "test"), i)["image"][:, :, 0], cmap="gray", vmin=-1, vmax=1)
        ax.set_title(f"{want} -> {got!r}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", "samples.png"), dpi=100)
    plt.close(fig)
