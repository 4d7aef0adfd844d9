"""Train a VLM on rendered arithmetic expressions in stages through the one loop, and measure reading and answering.

Stages (each a `loop.Task` on `loop.train`, in its own workdir subfolder, resumable; a stage with steps=0 is skipped):
  pretrain  the LM alone on the text version of the task ("read:" -> "2+4", "value:" -> the trace "2+4=6\nA 6\n"
            with task.answer="trace", or "6" with "value"), the expression given
            as text: with task.text_layout="grid" each image cell's character as a token where the image tokens go
            (the image as text: needs task.cell = the patch size), with "prompt" after the prompt ("value:2+4");
            the "pretrained LM" LLaVA and PaliGemma start from; with `pretrain.until_exact` > 0 it runs until the LM
            computes (`next_pretrain_block`: checks of held-out answers at the largest K after `steps` steps and
            every `check_every` steps, each block a warm restart of the lr, up to `max_steps`; <stage>/checks.json);
  stage1    read the expression from the image ("read:" -> "23+45"); trains the groups in `stage1.train`
            (default the projector, as LLaVA's stage 1; add "vision" to train the encoder too);
  stage2    both prompts ("mixed"), the answer being the chain's trace or value; trains `stage2.train` (default
            projector + LM); with `stage2.lora_rank` > 0 the LM is trained through LoRA adapters of that rank
            (framework.peft: the LM's base frozen, the adapters merged into it afterwards).
Groups not trained in a stage are frozen by the loop's optimiser labels (`vlm.param_groups`): bitwise unchanged.

Artifacts in `workdir`: <stage>/{config.json, metrics.jsonl, checkpoints/}, results/vlm.json (after pretraining,
with `eval.text_ceiling`, the LM's reading and answering given the image as text: the ceiling; after stages 1 and 2
(`eval.modes`) reading accuracy per character and per expression and answer exact match by K, graded by
`arithmetic.check_solution` for traces, beside the floor of always answering the most common value),
figures/samples.png (rendered eval images with the model's readings).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from configs.vlm import common as vlm_common
from framework import config as config_lib
from framework import sharding
from framework.models import vlm
from framework.peft import lora
from framework.tasks import arithmetic, render
from framework.tasks.data import split_seed
from framework.training import loop

log = logging.getLogger(__name__)
STAGES = ("pretrain", "stage1", "stage2")
MODES = ("read", "compute")


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
        answer=t.answer,
        read_every=t.read_every,
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
        req(sc.lora_rank >= 0, f"{s}.lora_rank", f"must be >= 0, got {sc.lora_rank}")
        req(sc.lora_rank == 0 or "lm" in sc.train, f"{s}.lora_rank", "LoRA adapts the LM: 'lm' must be in train")
    bad = [m for m in config.eval.modes if m not in MODES]
    req(not bad and len(config.eval.modes) > 0, "eval.modes", f"{tuple(config.eval.modes)} must be some of {MODES}")
    req(config.pretrain.lora_rank == 0, "pretrain.lora_rank", "the text-only stage trains the whole LM (0)")
    req(tuple(config.pretrain.train) == ("lm",), "pretrain.train", "the text-only stage trains ('lm',) alone")
    pc = config.pretrain
    req(0.0 <= pc.until_exact <= 1.0, "pretrain.until_exact", f"must be in [0, 1] (0: off), got {pc.until_exact}")
    req(pc.check_every >= 0, "pretrain.check_every", f"must be >= 0, got {pc.check_every}")
    if pc.until_exact > 0 and pc.steps > 0:  # steps 0 skips the stage, rule and all
        req(
            pc.check_every > 0,
            "pretrain.check_every",
            f"must be > 0 with pretrain.until_exact > 0, got {pc.check_every}",
        )
        req(pc.max_steps >= pc.steps, "pretrain.max_steps", f"{pc.max_steps} < pretrain.steps ({pc.steps})")
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
    if config[stage].lora_rank:
        return _train_lora_stage(config, stage, params, workdir, batches, task)
    loop_task = loop.Task(
        init_params=lambda rng: params,
        logical_axes=vlm.logical_axes(cfg),
        loss_fn=vlm.loss_fn(cfg),
        batches=batches,
        flops_per_example=vlm.flops_per_example(cfg, task.seq_len()),
        param_labels=vlm.param_groups,
        label_settings={g: None for g in vlm.GROUPS if g not in trained},
    )
    if text and config.pretrain.until_exact > 0:
        return _pretrain_until(config, loop_task, os.path.join(workdir, stage))
    state = loop.train(_stage_config(config, stage), os.path.join(workdir, stage), loop_task)
    return jax.device_get(state.params)


def next_pretrain_block(pc, step: int, exact: float) -> tuple[int, dict] | None:
    """The stopping rule of the text pretraining (`config.pretrain`): after a check at `step` whose held-out answer
    exact match is `exact`, None (stop: the threshold `until_exact` is met or `max_steps` reached) or (the step to
    train to next, the "lm" label's optimiser settings for that block: its lr restarts at `lr` at `step`)."""
    if exact >= pc.until_exact or step >= pc.max_steps:
        return None
    # The config's schedule is a warm-up over `warmup_steps` then a cosine to `steps`: a warm-up ending at the block's
    # first step is a restart there (the warm-up's earlier part lies in steps already trained).
    return min(step + pc.check_every, pc.max_steps), {"lr": pc.lr, "warmup_steps": step}


def _pretrain_until(config, loop_task: loop.Task, workdir: str):
    """Pretrains under the stopping rule (`next_pretrain_block`), checking after `pretrain.steps` steps and after
    every block; each check is appended to `workdir`/checks.json. Returns the params at the stop."""
    cfg, pc = model_config(config), config.pretrain
    check = make_task(config, "compute", text=True)
    kmax = max(config.task.num_steps)
    check = dataclasses.replace(check, knobs=arithmetic.make_knobs(**{**check.knobs.as_kwargs(), "num_steps": kmax}))
    path = os.path.join(workdir, "checks.json")
    checks = json.load(open(path)) if os.path.exists(path) else []
    target, lm_settings = pc.steps, None
    while True:
        c = _stage_config(config, "pretrain")
        c.train.steps = target
        t = loop_task
        if lm_settings is not None:
            t = dataclasses.replace(loop_task, label_settings={**loop_task.label_settings, "lm": lm_settings})
        state = loop.train(c, workdir, t)  # resumes; a checkpoint at or past `target` trains nothing
        params, step = jax.device_get(state.params), int(state.step)
        ev = dict(seed=config.seed, n=config.eval.problems_per_k, batch_size=config.eval.batch_size, split="eval")
        exact = evaluate(params, cfg, check, **ev)[kmax]["exact"]
        checks = [r for r in checks if r["step"] < step] + [{"step": step, "k": kmax, "exact": exact}]
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(checks, f, indent=2)
        log.info("pretrain check at step %d: held-out answer exact at K=%d %.3f", step, kmax, exact)
        nxt = next_pretrain_block(pc, step, exact)
        if nxt is None:
            return params
        target, lm_settings = nxt


def lora_task(
    cfg: vlm.VLMConfig,
    params,
    *,
    rank: int,
    trained: tuple[str, ...],
    batches,
    flops_per_example: float = 0.0,
    seed: int = 0,
):
    """A `loop.Task` training the VLM with its LM through LoRA adapters of `rank` (framework.peft, alpha = 2 rank):
    the LM's base is the task's frozen input, the groups of `trained` other than "lm" train in full, the rest are
    frozen by labels. Returns (task, finish): `finish(trained_params)` gives plain VLM params, the adapters merged."""
    lora_cfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
    wrap = jax.jit(lambda p, key: lora.add_adapters(p, lora_cfg, key, model_cfg=cfg.lm))  # one program, not one per op
    adapted = wrap(params["lm"], jax.random.key(seed))
    others = tuple(g for g in vlm.GROUPS if g != "lm")
    trainable = {g: params[g] for g in others} | {"lora": lora.adapter_params(adapted)}
    axes = vlm.logical_axes(cfg)
    base_loss = vlm.loss_fn(cfg)

    def loss(p, batch, frozen_lm):
        return base_loss({g: p[g] for g in others} | {"lm": lora.set_adapters(frozen_lm, p["lora"])}, batch)

    def labels(p):
        return vlm.param_groups({g: p[g] for g in others}) | {"lora": jax.tree.map(lambda _: "lm", p["lora"])}

    def finish(p):
        return {g: p[g] for g in others} | {"lm": lora.merge(lora.set_adapters(adapted, p["lora"]))}

    task = loop.Task(
        init_params=lambda rng: trainable,
        logical_axes={g: axes[g] for g in others} | {"lora": jax.tree.map(lambda _: P(), trainable["lora"])},
        loss_fn=loss,
        batches=batches,
        flops_per_example=flops_per_example,
        param_labels=labels,
        label_settings={g: None for g in vlm.GROUPS if g not in trained},
        frozen=adapted,
    )
    return task, finish


def _train_lora_stage(config, stage: str, params, workdir: str, batches, task: render.VLMTask):
    cfg, sc = model_config(config), config[stage]
    loop_task, finish = lora_task(
        cfg,
        params,
        rank=sc.lora_rank,
        trained=tuple(sc.train),
        batches=batches,
        flops_per_example=vlm.flops_per_example(cfg, task.seq_len()),
        seed=config.seed + 99,
    )
    state = loop.train(_stage_config(config, stage), os.path.join(workdir, stage), loop_task)
    return finish(jax.device_get(state.params))


def max_new_tokens(task: render.VLMTask) -> int:
    """Tokens the longest completion of `task` needs (reading or answering, plus EOS): one length for every K and
    prompt, so one compiled generate serves them all."""
    k = task.knobs
    hi, w = k.steps_range[1], arithmetic.number_width(k.modulus)
    longest = hi * (1 + w) + w
    if task.answer == "trace":
        longest = max(longest, arithmetic.solution_length(hi, k.modulus))
    return longest + 1


def evaluate(
    params, cfg: vlm.VLMConfig, task: render.VLMTask, *, seed: int, n: int, batch_size: int, split: str = "test"
) -> dict:
    """Greedy answers on `n` held-out examples per K: reading accuracy (chars, whole) or answer exact match by K.

    A text task (`task.text`) is the LM given the expression as text, no image: the ceiling of the image model. For
    "compute", "exact" is the right final value (`arithmetic.check_solution` of a trace), "trace_exact" the whole
    gold trace, and "floor" the exact match of always answering the most common value of these problems. `split`:
    the problems' stream ("test"; the pretraining's stopping rule checks on "eval")."""
    out: dict = {}
    lo, hi = task.knobs.steps_range
    max_new = max_new_tokens(task)
    for k in range(lo, hi + 1):
        kt = dataclasses.replace(task, knobs=arithmetic.make_knobs(**{**task.knobs.as_kwargs(), "num_steps": k}))
        exs = [kt.example(split_seed(seed, split), i) for i in range(n)]
        got = []
        for i in range(0, n, batch_size):
            chunk = exs[i : i + batch_size]
            res = vlm.generate(
                params,
                cfg,
                None if kt.text else np.stack([e["image"] for e in chunk]),
                [kt.prompt_ids(e["prompt"], e["grid"]) for e in chunk],
                max_new_tokens=max_new,
            )
            got += render.VLM_TOKENIZER.decode_batch(np.asarray(res.tokens))
        want = [e["completion"] for e in exs]
        chars = [sum(a == b for a, b in zip(g, w)) / max(len(w), len(g), 1) for g, w in zip(got, want)]
        whole = [g == w for g, w in zip(got, want)]
        out[k] = {"exact": float(np.mean(whole)), "char_accuracy": float(np.mean(chars)), "n": n}
        if task.mode == "compute":
            if task.answer == "trace":
                out[k]["trace_exact"] = out[k]["exact"]
                out[k]["exact"] = float(
                    np.mean([arithmetic.check_solution(e["problem"], g).answer_correct for e, g in zip(exs, got)])
                )
            counts = collections.Counter(e["problem"].answer for e in exs)
            out[k]["floor"] = max(counts.values()) / n
        out[k]["samples"] = [[w, g] for w, g in zip(want[:6], got[:6])]
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
        checks = os.path.join(workdir, stage, "checks.json")
        if stage == "pretrain" and config.pretrain.until_exact > 0 and os.path.exists(checks):
            results["pretrain_checks"] = json.load(open(checks))
        if stage == "pretrain" and config.eval.text_ceiling:
            results["stages"][stage] = {m: evaluate(params, cfg, make_task(config, m, text=True), **ev) for m in MODES}
        elif stage != "pretrain":
            # Answering after stage 1 too: whether reading alignment alone lets the text-trained LM compute.
            modes = tuple(config.eval.modes)
            results["stages"][stage] = {m: evaluate(params, cfg, make_task(config, m), **ev) for m in modes}
            if stage == "stage2":  # the final LM given the text instead of the image: what it kept of the text task
                results["stages"][stage]["text_compute"] = evaluate(
                    params, cfg, make_task(config, "compute", text=True), **ev
                )
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
    stages = {s: r for s, r in results["stages"].items() if s != "pretrain"}
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
