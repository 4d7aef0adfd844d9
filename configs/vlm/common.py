"""The `vlm` experiment's default config (its schema) and the pieces its variants share; no framework imports."""

from __future__ import annotations

import ml_collections

from configs import common

# Image 32x64 px in 8-px patches: a 4x8 grid, N = 32 image tokens. The LM reads the printable-text tokenizer's 100
# ids plus the image placeholder (id 100); 104 keeps the table a multiple of 8.
VISION = dict(
    image_height=32,
    image_width=64,
    channels=1,
    patch_size=8,
    d_model=64,
    n_layers=2,
    n_heads=4,
    d_ff=128,
    pos_embedding="learned",
    mlp_activation="gelu_tanh",
    norm_eps=1e-6,
    attention_impl="xla",
    dtype="float32",
    param_dtype="float32",
    init_std=0.02,
)


def stage(steps: int, lr: float, mode: str, train: tuple[str, ...], lora_rank: int = 0) -> ml_collections.ConfigDict:
    """One training stage: its steps and peak lr, the prompt mode, the param groups it trains and, with lora_rank > 0,
    LoRA adapters of that rank on the LM instead of the full LM (the "lm" group must be trained)."""
    return ml_collections.ConfigDict(dict(steps=steps, lr=lr, mode=mode, train=tuple(train), lora_rank=lora_rank))


def vlm_experiment(*, seed: int = 0) -> ml_collections.ConfigDict:
    """A full `vlm` experiment config: model (vision, lm, projector, mask), task, stages, train, eval, mesh."""
    config = ml_collections.ConfigDict()
    config.experiment = "vlm"
    config.seed = seed
    config.model = ml_collections.ConfigDict(
        dict(
            vision=VISION,
            lm=common.model_config("tiny", vocab_size=104, tokenizer="text", max_seq_len=128),
            projector="mlp",
            image_token_id=100,
            prefix_lm=True,
        )
    )
    config.task = ml_collections.ConfigDict(
        dict(
            num_steps=(1, 3),
            ops="+-*",
            modulus=10,
            scale=(1, 1),
            jitter=False,  # glyphs centred in their cells (True: a random offset inside the cell)
            noise=0.0,
            distractors=0,
            cell=8,  # one character per 8-px patch (0: free placement, glyphs straddle patches)
            line_jitter=False,
            text_layout="grid",  # the text-only LM reads the image's cells as tokens ("prompt": inline)
            answer="trace",  # "value:" completes the step-by-step trace ending "A <value>" ("value": the value alone)
            read_every=4,  # "mixed" stages: one row in 4 reads, the others compute
        )
    )
    config.pretrain = stage(600, 3e-3, "mixed", ("lm",))
    # The stopping rule of the text pretraining (until_exact 0: exactly `steps` steps). With until_exact > 0, after
    # `steps` steps and then every `check_every` steps the LM answers held-out "eval"-split problems of the largest K
    # from text; it stops at the first check whose answer exact match is >= until_exact, or at max_steps. Each
    # block of check_every steps after the first `steps` restarts the lr at pretrain.lr, cosine-decayed to
    # lr * train.min_lr_ratio at the block's end (a warm restart: a plateaued LM gets a large lr again).
    config.pretrain.update(dict(until_exact=0.0, check_every=0, max_steps=0))
    config.stage1 = stage(600, 1e-2, "read", ("projector", "vision"))
    config.stage2 = stage(600, 1e-3, "mixed", ("projector", "lm", "vision"))
    config.train = common.train_config(steps=1, batch_size=32, warmup_steps=30, log_every=50, checkpoint_every=200)
    config.eval = ml_collections.ConfigDict(
        dict(problems_per_k=64, batch_size=64, text_ceiling=True, modes=("read", "compute"))
    )
    config.mesh = common.mesh_config()
    return config
