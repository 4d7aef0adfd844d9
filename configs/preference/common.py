"""The preference experiment's config schema: an SFT stage (a partly right policy), pairs, the loss, training."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common


def preference_experiment(*, size: str = "tiny", kind: str = "sigmoid", seed: int = 0) -> ml_collections.ConfigDict:
    """A full `preference` config: seed, model, task knobs, sft (train settings of the SFT stage; steps=0 skips it),
    pairs, pref (the loss and the reference), train, eval, mesh."""
    config = ml_collections.ConfigDict()
    config.experiment = "preference"
    config.seed = seed
    config.model = common.model_config(size)
    config.task = common.task_config(num_steps=(1, 3), pack=False)
    config.sft = common.train_config(
        steps=0, batch_size=32, seq_len=64, lr=1e-2, warmup_steps=50, log_every=50, checkpoint_every=500
    )
    config.pairs = ml_collections.ConfigDict(
        dict(
            n=512,  # training pairs (a whole number of batches is used; the order is shuffled once by the seed)
            eval_n=128,  # held-out pairs (split "eval") for reward accuracy and margins
            flip_rate=0.0,  # fraction of pairs whose labels are swapped (label noise)
            length_skew=0,  # filler characters after the chosen (> 0) or rejected (< 0) answer line
            # "corrupt": gold trace vs the gold trace with one corrupted step; "policy": gold trace vs a wrong
            # completion of the starting policy (`samples` per problem at `temperature`; n = problems sampled)
            source="corrupt",
            samples=4,
            temperature=1.0,
        )
    )
    config.pref = ml_collections.ConfigDict(
        dict(
            kind=kind,  # one of framework.prefopt.KINDS, several joined by "," (weighted by `weights`), or "kto"
            weights=config_dict.placeholder(tuple),
            beta=0.1,
            epsilon=0.0,
            gamma=0.5,
            alpha=0.0,
            tau=0.05,
            desirable_weight=1.0,  # KTO's λ_D and λ_U (kind "kto": unpaired rows, train.batch_size rows a step)
            undesirable_weight=1.0,
            precompute_ref_logps=False,  # reference log-probs computed once and cached as dataset columns
            lora_rank=0,  # > 0: train LoRA adapters; the reference is the base with adapters at their zero init
            lora_alpha=16.0,
        )
    )
    config.train = common.train_config(
        steps=200,
        batch_size=16,
        seq_len=64,
        lr=3e-4,
        warmup_steps=10,
        min_lr_ratio=1.0,
        weight_decay=0.0,
        log_every=10,
        checkpoint_every=100,
    )
    config.eval = ml_collections.ConfigDict(dict(problems_per_k=32, batch_size=128))
    config.mesh = common.mesh_config()
    return config
