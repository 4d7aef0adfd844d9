"""Small helpers that compose experiment configs (no framework imports: a config reads without building anything)."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Arithmetic task tokenizer size (framework.tasks.tokenizer.VOCAB_SIZE; checked at validation time).
ARITH_VOCAB_SIZE = 24

# Model sizes trained on the arithmetic task. `tiny` is for tests and notebooks, `small` for the quickstart,
# `base` for studies (and the train-step benchmark).
MODEL_SIZES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192),
    "small": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384),
    "base": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a `key=value,key=value` config argument (the part after `:` in `--config=file.py:arg`)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}")
        out[key] = type(defaults[key])(value) if defaults[key] is not None else value
    return ml_collections.ConfigDict(out)


def model_config(size: str = "small", **overrides) -> ml_collections.ConfigDict:
    """The decoder LM config (fields of framework.models.lm.LMConfig) for a named size."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model size {size!r} is not one of {sorted(MODEL_SIZES)}")
    cfg = dict(
        vocab_size=ARITH_VOCAB_SIZE,
        max_seq_len=256,
        rope_theta=10000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
        final_logit_softcap=config_dict.placeholder(float),
        attention_impl="xla",
        # The arithmetic sizes are shallow (<= 6 layers): the unrolled block loop trains ~1.2x faster than the layer
        # scan on CPU for a negligible compile-time cost. Deep models want True (compile time independent of depth).
        scan_layers=False,
        remat="none",
        dtype="float32",
        param_dtype="float32",
        bos_id=1,
        eos_ids=(2,),
        pad_id=0,
        init_std=0.02,
        hf_path=config_dict.placeholder(str),  # a local Hugging Face folder to import instead of training an LM
    )
    cfg.update(MODEL_SIZES[size])
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def task_config(**overrides) -> ml_collections.ConfigDict:
    """Knobs of the modular-arithmetic task (framework.tasks.arithmetic.sample_problems)."""
    cfg = dict(
        num_steps=(1, 8),
        ops="+-*",
        op_weights=config_dict.placeholder(tuple),
        modulus=100,
        answer_mod=config_dict.placeholder(int),
        loss_on="solution",
        pack=True,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def train_config(**overrides) -> ml_collections.ConfigDict:
    """Optimiser, schedule, logging and checkpoint settings of the generic training loop."""
    cfg = dict(
        steps=1000,
        batch_size=64,
        seq_len=128,
        lr=3e-3,
        warmup_steps=100,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        grad_clip=1.0,
        log_every=25,
        eval_every=0,
        stop_when="",  # early stopping on an eval metric, e.g. "token_accuracy>=0.98" (needs eval_every > 0)
        frozen=(),  # regexes over '/'-joined param paths (e.g. '.*embed.*'): those params are frozen, bitwise
        checkpoint_every=250,
        keep_checkpoints=3,
        keep_checkpoint_every=0,  # also keep every checkpoint whose step is a multiple of this (0 = none)
        async_checkpoint=True,  # write checkpoints in the background while training goes on
        nonfinite="stop",
        peak_flops=config_dict.placeholder(float),
        progress=True,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


# Logical axis (the names model code gives parameter and activation dims) -> mesh axes, comma-separated ("" =
# replicated). An axis whose mesh size is 1 drops out, so DP / FSDP / TP / FSDP+TP are choices of mesh sizes alone:
# data=-1 (DP), fsdp=-1 (FSDP: params and optimizer state split along `embed`), tensor=N (TP: heads and mlp split).
SHARDING_RULES = dict(
    batch="data,fsdp",
    seq="",
    embed="fsdp",
    heads="tensor",
    kv_heads="tensor",
    head_dim="",
    mlp="tensor",
    vocab="tensor",
    latents="tensor",
    layers="",
)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1, **rules: str) -> ml_collections.ConfigDict:
    """Device mesh axis sizes (-1 fills the remaining devices) and the logical-axis rules table (`rules`)."""
    table = dict(SHARDING_RULES)
    unknown = sorted(set(rules) - set(table))
    if unknown:
        raise ValueError(f"mesh_config: unknown logical axes {unknown}; expected some of {sorted(table)}")
    table.update(rules)
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=table))


def lm_experiment(*, size: str = "small", seed: int = 0, **sections) -> ml_collections.ConfigDict:
    """A full `train_lm` experiment config: seed, model, task, train, eval, mesh."""
    config = ml_collections.ConfigDict()
    config.experiment = "train_lm"
    config.seed = seed
    config.model = model_config(size)
    config.task = task_config()
    config.train = train_config()
    config.eval = ml_collections.ConfigDict(dict(problems_per_k=64, batch_size=128, decode_parity_problems=8))
    config.mesh = mesh_config()
    for name, values in sections.items():
        config[name].update(values)
    return config


# The tiny mod-10 arithmetic LM that the quickstart, the SAE experiment and the test-time scaling, quantisation and
# LoRA studies share: one-digit numbers (`Q 3+4*7-1`), all three ops, K = 1..8, a 100k-parameter model a 2-core CPU
# trains in minutes. Each user overrides what it must, visibly, through `mod10_lm(**train_overrides)`.
MOD10_TRAIN = dict(batch_size=32, seq_len=80, lr=3e-3, checkpoint_every=500, log_every=100)


def mod10_lm(*, size: str = "tiny", seed: int = 0, **train_overrides) -> ml_collections.ConfigDict:
    """The shared tiny mod-10 LM recipe (a `train_lm` config): `MOD10_TRAIN`, then the caller's `train` overrides."""
    config = lm_experiment(size=size, seed=seed)
    config.task.modulus = 10
    config.train.update(MOD10_TRAIN)
    config.train.update(train_overrides)
    return config
