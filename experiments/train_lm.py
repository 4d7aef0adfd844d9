"""Train a decoder LM on modular-arithmetic chains and measure exact-match accuracy by number of steps K.

Artifacts in `workdir`: config.json, metrics.jsonl, tensorboard/, checkpoints/, results/accuracy_by_k.json,
results/decode_parity.json, figures/accuracy_by_k.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from configs import common
from framework import config as config_lib
from framework import inference, sharding
from framework.inference import reference
from framework.models import lm
from framework.models.config import HF_PATH_KEY
from framework.tasks import arithmetic, data, policy_eval
from framework.tasks import tokenizer as tok
from framework.training import loop
from framework.training import metrics as metrics_lib
from framework.training.loss import held_out_eval, lm_loss_fn
from framework.training.settings import RunSettings

log = logging.getLogger(__name__)

# What the held-out eval (every train.eval_every steps and at the end) returns; train.stop_when may name either.
EVAL_METRICS = ("loss", "token_accuracy")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The `eval` section: held-out problems per K, decode batch size, decode-parity prompts."""

    problems_per_k: int
    batch_size: int
    decode_parity_problems: int


@dataclasses.dataclass(frozen=True)
class Spec:
    """A train_lm config parsed once (`parse`): the typed objects everything below `run` reads."""

    model: lm.LMConfig
    task: arithmetic.Knobs
    loss_on: str  # "solution" or "all" (framework.tasks.data.LOSS_ON)
    pack: bool
    eval: EvalSettings
    run: RunSettings  # seed, train and mesh settings, and the config's record for the workdir

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def knobs(self) -> dict:
        """The task knobs as keyword arguments of the data and eval functions."""
        return self.task.as_kwargs()


def knobs(config: ml_collections.ConfigDict | Spec) -> dict:
    """Task knobs (arithmetic.Knobs fields, as keyword arguments) of a train_lm config or its parsed `Spec`."""
    if isinstance(config, Spec):
        return config.knobs
    return arithmetic.Knobs.from_config(config.task).as_kwargs()


def parse(config: ml_collections.ConfigDict | Spec) -> Spec:
    """Validates a train_lm config (keys, types, combinations; compiles nothing) and parses it into a `Spec`."""
    if isinstance(config, Spec):
        return config
    model_cfg, task = _validate(config)
    e = config.eval
    return Spec(
        model=model_cfg,
        task=task,
        loss_on=config.task.loss_on,
        pack=bool(config.task.pack),
        eval=EvalSettings(int(e.problems_per_k), int(e.batch_size), int(e.decode_parity_problems)),
        run=RunSettings.from_config(config),
    )


def validate(config: ml_collections.ConfigDict) -> lm.LMConfig:
    """Checks keys, types and combinations of a train_lm config; returns the model config. Compiles nothing."""
    return _validate(config)[0]


def _validate(config: ml_collections.ConfigDict) -> tuple[lm.LMConfig, arithmetic.Knobs]:
    reference = common.lm_experiment()
    if HF_PATH_KEY in config.model and HF_PATH_KEY not in reference.model:
        reference.model[HF_PATH_KEY] = None  # an experiment config's optional imported checkpoint (None here)
    config_lib.check_against(config, reference)
    hf_path = config.model.get(HF_PATH_KEY)
    config_lib.require(
        hf_path is None,
        f"model.{HF_PATH_KEY}",
        f"{hf_path!r}: train_lm trains a new LM on the arithmetic task; imported checkpoints are read by the "
        "experiments that take a trained LM (e.g. sae)",
    )
    try:
        model_cfg = lm.LMConfig.from_config(config.model)
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(str(e)) from None
    try:
        k = arithmetic.make_knobs(**knobs(config))
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(f"config section 'task': {e}") from None
    tc = config.train
    req = config_lib.require
    req(
        model_cfg.vocab_size == tok.VOCAB_SIZE,
        "model.vocab_size",
        f"must equal the arithmetic tokenizer's vocabulary ({tok.VOCAB_SIZE}), got {model_cfg.vocab_size}",
    )
    need = data.max_seq_len(k.steps_range[1], k.modulus, k.answer_mod)
    req(
        tc.seq_len >= need,
        "train.seq_len",
        f"{tc.seq_len} is shorter than the longest example ({need} tokens "
        f"for task.num_steps={k.num_steps}); raise train.seq_len or lower the max of task.num_steps",
    )
    req(
        tc.seq_len <= model_cfg.max_seq_len,
        "train.seq_len",
        f"{tc.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}",
    )
    for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        req(tc[key] > 0, f"train.{key}", f"must be positive, got {tc[key]}")
    req(
        tc.keep_checkpoint_every >= 0,
        "train.keep_checkpoint_every",
        f"must be >= 0 (0 = keep only the newest train.keep_checkpoints), got {tc.keep_checkpoint_every}",
    )
    req(tc.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = only at the end), got {tc.eval_every}")
    criterion = loop.parse_stop_when(tc.stop_when)
    if criterion:
        metric = criterion[0]
        req(metric in EVAL_METRICS, "train.stop_when", f"metric {metric!r} is not one of the eval's {EVAL_METRICS}")
        req(tc.eval_every > 0, "train.stop_when", f"needs train.eval_every > 0 to evaluate, got {tc.eval_every}")
    req(tc.nonfinite in ("stop", "skip"), "train.nonfinite", f"must be 'stop' or 'skip', got {tc.nonfinite!r}")
    parity_n = config.eval.decode_parity_problems
    req(parity_n >= 0, "eval.decode_parity_problems", f"must be >= 0 (0 = skip the check), got {parity_n}")
    req(tc.lr > 0, "train.lr", f"must be positive, got {tc.lr}")
    req(config.task.loss_on in data.LOSS_ON, "task.loss_on", f"must be one of {data.LOSS_ON}")
    try:
        shape = sharding.mesh_shape(config.mesh)
        sharding.rules_from_config(config.mesh)
    except ValueError as e:
        raise config_lib.ConfigError(f"config section 'mesh': {e}") from None
    split = shape[0] * shape[1]
    req(
        tc.batch_size % split == 0,
        "train.batch_size",
        f"{tc.batch_size} is not divisible by mesh.data*mesh.fsdp = {split}",
    )
    return model_cfg, k


def _eval_loss_fn(spec: Spec, loss_fn, n_batches: int = 4):
    eval_ds = data.make_dataset(
        seed=spec.seed,
        batch_size=spec.run.train.batch_size,
        seq_len=spec.run.train["seq_len"],
        loss_on=spec.loss_on,
        split="eval",
        num_batches=n_batches,
        **spec.knobs,
    )
    return held_out_eval(loss_fn, [{k: np.asarray(b[k]) for k in ("tokens", "loss_mask")} for b in eval_ds])


def decode_parity(params, model_cfg, config: ml_collections.ConfigDict | Spec) -> dict:
    """Cached `generate` vs the no-cache reference decode on held-out prompts: greedy and sampled ({} when the
    config asks for 0 prompts)."""
    spec = parse(config)
    if spec.eval.decode_parity_problems == 0:
        return {}
    problems = policy_eval.eval_problems(
        spec.seed, spec.task.steps_range[1], spec.eval.decode_parity_problems, **spec.knobs
    )
    prompts = [data.encode_prompt(p) for p in problems]
    max_new = arithmetic.solution_length(problems[0].num_steps, problems[0].modulus) + 1
    out = {}
    for mode, kw in (("greedy", {}), ("sampled", dict(temperature=1.0, rng=jax.random.key(spec.seed + 1)))):
        fast = inference.generate(params, model_cfg, prompts, max_new_tokens=max_new, **kw)
        slow = reference.reference_generate(params, model_cfg, prompts, max_new_tokens=max_new, **kw)
        same = bool(np.array_equal(np.asarray(fast.tokens), np.asarray(slow.tokens)))
        diff = float(np.max(np.abs(np.asarray(fast.logprobs) - np.asarray(slow.logprobs))))
        out[mode] = {"tokens_identical": same, "max_abs_logprob_diff": diff}
    return out


def make_task(config: ml_collections.ConfigDict | Spec) -> tuple[lm.LMConfig, loop.Task]:
    """The model config and the `loop.Task` (init, loss, batches, eval) this experiment trains; parses (validates) a
    ConfigDict first.

    Notebooks and benchmarks call this to train or time exactly what `run` trains.
    """
    spec = parse(config)
    model_cfg, tc = spec.model, spec.run.train

    def train_ds(rows=None):  # rows=(lo, hi): only this process's rows of each global batch
        return data.make_dataset(
            seed=spec.seed,
            batch_size=tc.batch_size,
            seq_len=tc["seq_len"],
            loss_on=spec.loss_on,
            split="train",
            pack=spec.pack,
            rows=rows,
            **spec.knobs,
        )

    batch_keys = ("tokens", "loss_mask") + (("positions", "segment_ids") if spec.pack else ())
    loss_fn = lm_loss_fn(model_cfg)
    task = loop.Task(
        init_params=lambda rng: lm.init(model_cfg, rng),
        logical_axes=lm.logical_axes(model_cfg),
        loss_fn=loss_fn,
        batches=lambda start, rows=None: (
            {k: b[k] for k in batch_keys} for b in data.batch_iterator(train_ds(rows), start)
        ),
        flops_per_example=lm.flops_per_token(model_cfg, tc["seq_len"]) * tc["seq_len"],
        eval_fn=_eval_loss_fn(spec, loss_fn),
    )
    return model_cfg, task


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from `workdir` if it holds checkpoints), evaluates, writes artifacts; returns results.

    The results dict holds the final step, accuracy by K, decode parity and the trained `params` (host arrays).
    """
    spec = parse(config)  # the one place the ConfigDict is read
    model_cfg, task = make_task(spec)
    state = loop.train(spec.run, workdir, task)
    if jax.process_count() > 1:  # params span other hosts' devices: gather a full host copy on every process
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(state.params, tiled=True)
    else:
        params = jax.device_get(state.params)

    k_lo, k_hi = spec.task.steps_range
    acc = policy_eval.accuracy_by_k(
        params,
        model_cfg,
        seed=spec.seed,
        ks=range(k_lo, k_hi + 1),
        problems_per_k=spec.eval.problems_per_k,
        knobs=spec.knobs,
        batch_size=spec.eval.batch_size,
    )
    parity = decode_parity(params, model_cfg, spec)
    results = {"step": int(state.step), "accuracy_by_k": acc, "decode_parity": parity}
    if jax.process_index() == 0:
        _write_artifacts(workdir, results)
        steps, stop_when = spec.run.train.steps, spec.run.train.stop_when
        stopped = f" (train.stop_when {stop_when!r} met)" if int(state.step) < steps else ""
        print(f"greedy accuracy by K after {int(state.step)} of {steps} steps{stopped}:")
        print(format_table(acc))
        if parity:
            print(metrics_lib.format_metrics("decode parity vs the no-cache reference:", parity))
    return dict(results, params=params)


def format_table(acc: dict[int, dict[str, float]]) -> str:
    """A fixed-width table of accuracy by K."""
    lines = ["   K | exact match | answer acc | step acc |   n", "-----+-------------+------------+----------+-----"]
    for k, r in sorted(acc.items()):
        lines.append(
            f"{k:4d} | {r['exact_match']:11.3f} | {r['answer_accuracy']:10.3f} | "
            f"{r['step_accuracy']:8.3f} | {r['n']:3d}"
        )
    return "\n".join(lines)


def _write_artifacts(workdir: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    with open(os.path.join(workdir, "results", "accuracy_by_k.json"), "w") as f:
        json.dump({"step": results["step"], "accuracy_by_k": results["accuracy_by_k"]}, f, indent=2)
    with open(os.path.join(workdir, "results", "decode_parity.json"), "w") as f:
        json.dump(results["decode_parity"], f, indent=2)
    acc = results["accuracy_by_k"]
    ks = sorted(acc)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("exact_match", "exact match"), ("step_accuracy", "per-step accuracy")):
        ax.plot(ks, [acc[k][key] for k in ks], marker="o", label=label)
    ax.set(
        xlabel="number of steps K",
        ylabel="accuracy",
        ylim=(0, 1.02),
        title=f"greedy accuracy by K (step {results['step']})",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", "accuracy_by_k.png"), dpi=120)
    plt.close(fig)
